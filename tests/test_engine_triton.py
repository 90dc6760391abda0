"""The engine end to end with every kernel on its Triton path (interpreted on CPU) equals the
reference path: same particles, same weights, for a few PF rounds on a tiny model."""
import pytest

from pfengine import Engine, EngineConfig, Request, SamplingParams, SearchParams

pytest.importorskip("triton")


def run(policy_dir: str, prm: str) -> tuple:
    engine = Engine(EngineConfig(model=policy_dir, prm=prm, num_blocks=64, block_size=8))
    r = engine.generate([Request(prompt="Step 1: add 17 and 25.",
                                 sampling=SamplingParams(seed=2, max_step_tokens=4, max_steps=3),
                                 search=SearchParams(n_particles=4, aggregation="last"))])[0]
    engine.policy.blocks.check_invariants()
    return r, engine.stats()


def count_triton_launches(monkeypatch) -> dict[str, int]:
    """Wrap each kernel module's Triton entry point to prove the engine really took that path."""
    from pfengine.kernels import copy_blocks, fork, kv_store, paged_attention, prm_score, resample

    counts: dict[str, int] = {}
    for module, name in [(paged_attention, "paged_decode_attention_triton"), (kv_store, "store_kv_triton"),
                         (fork, "fork_triton"), (prm_score, "score_particles_triton"),
                         (resample, "resample_triton"), (copy_blocks, "copy_blocks_triton")]:
        counts[name] = 0

        def wrapped(*args, _f=getattr(module, name), _n=name, **kwargs):
            counts[_n] += 1
            return _f(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapped)
    return counts


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.parametrize("prm_kind", ["value_head", "prm_model"])
def test_triton_path_equals_reference_path(policy_dir, prm_dir, value_head_file, monkeypatch, prm_kind):
    prm = value_head_file if prm_kind == "value_head" else prm_dir
    monkeypatch.setenv("PFENGINE_TRITON", "0")
    ref, ref_stats = run(policy_dir, prm)
    monkeypatch.setenv("PFENGINE_TRITON", "1")
    launched = count_triton_launches(monkeypatch)
    tri, tri_stats = run(policy_dir, prm)
    assert all(launched[name] > 0 for name in launched), launched
    assert [p.token_ids for p in tri.particles] == [p.token_ids for p in ref.particles]
    assert [tr.ancestors for tr in tri.trace] == [tr.ancestors for tr in ref.trace]
    assert [p.weight for p in tri.particles] == pytest.approx([p.weight for p in ref.particles], abs=1e-5)
    assert tri_stats == ref_stats
