"""The engine end to end with every kernel on its Triton path (interpreted on CPU) equals the
reference path: same particles, same weights, for a few PF rounds on a tiny model."""
import pytest

from kernel_paths import assert_same_run, count_launches, run_pf

pytest.importorskip("triton")

TRITON_ENTRY_POINTS = [("paged_attention", "paged_decode_attention_triton"), ("kv_store", "store_kv_triton"),
                       ("fork", "fork_triton"), ("prm_score", "head_logit_triton"), ("prm_score", "weigh_triton"),
                       ("resample", "resample_triton"), ("copy_blocks", "copy_blocks_triton")]
RUN = dict(particles=4, steps=3, step_tokens=4, num_blocks=64)


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.parametrize("prm_kind", ["value_head", "prm_model"])
def test_triton_path_equals_reference_path(policy_dir, prm_dir, value_head_file, monkeypatch, prm_kind):
    prm = value_head_file if prm_kind == "value_head" else prm_dir
    monkeypatch.setenv("PFENGINE_TRITON", "0")
    ref = run_pf(policy_dir, prm, **RUN)
    monkeypatch.setenv("PFENGINE_TRITON", "1")
    launched = count_launches(monkeypatch, TRITON_ENTRY_POINTS)
    tri = run_pf(policy_dir, prm, **RUN)
    assert all(n > 0 for n in launched.values()), launched
    assert_same_run(tri, ref)
