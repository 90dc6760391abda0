"""Data parallelism on Ray without a cluster: errors that cross from an actor, the placement's checks,
the command-line flags, and pfengine without Ray installed. (The clusters themselves:
``test_dp_eval.py``, ``test_dp_serve.py``.)"""
import importlib.util
import os
import pickle
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.server_load import free_port
from pfengine.cache import OutOfBlocks
from pfengine.cli import main
from pfengine.config import InvalidArgument
from pfengine.dp.cluster import Placement, check_reachable, check_room
from pfengine.dp.errors import PortableError

REPO = Path(__file__).resolve().parents[1]


def across(error: BaseException) -> BaseException:
    """``error`` as an actor sends it and the driver gets it back (through pickle, as Ray does)."""
    return pickle.loads(pickle.dumps(PortableError.of(error))).rebuild()


def test_engine_errors_cross_processes_whole():
    with pytest.raises(TypeError):  # why they need it: their __init__ is not called with their args
        pickle.loads(pickle.dumps(InvalidArgument("search.n_particles", "must be >= 1, got 0")))
    e = across(InvalidArgument("search.n_particles", "must be >= 1, got 0"))
    assert type(e) is InvalidArgument and (e.field, e.message) == ("search.n_particles", "must be >= 1, got 0")
    assert str(e) == "search.n_particles: must be >= 1, got 0" and e.render(str.upper) == "SEARCH.N_PARTICLES: must be >= 1, got 0"
    e = across(OutOfBlocks(12, 3, "request 4"))
    assert type(e) is OutOfBlocks and vars(e) == vars(OutOfBlocks(12, 3, "request 4")) and str(e) == str(
        OutOfBlocks(12, 3, "request 4"))
    assert type(across(KeyError("k"))) is KeyError


def test_an_error_whose_fields_cannot_be_pickled_arrives_as_its_message():
    error = ValueError("bad thing")
    error.lock = __import__("threading").Lock()
    e = across(error)
    assert type(e) is RuntimeError and str(e) == "ValueError: bad thing"


@pytest.mark.parametrize("kwargs, message", [
    ({"engines": 0}, "--workers: must be an integer >= 1, got 0"),
    ({"engines": 2, "cpus": 0}, "--worker-cpus: must be an integer >= 1, got 0"),
    ({"engines": 2, "gpus": -1}, "--worker-gpus: must be an integer >= 0, got -1"),
    ({"engines": True}, "--workers: must be an integer >= 1, got True"),
    ({"engines": 2, "address": " "}, "--ray-address: must not be empty"),
    ({"engines": 0, "flag": "--replicas"}, "--replicas: must be an integer >= 1, got 0"),
])
def test_placement_names_the_flag_it_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Placement(**kwargs)


def test_a_placement_the_cluster_cannot_hold_is_refused():
    with pytest.raises(ValueError, match="--workers 3 x --worker-cpus 1 needs 3 CPUs; the Ray cluster has 2"):
        check_room(Placement(3), {"CPU": 2.0})
    with pytest.raises(ValueError, match="--replicas 2 x --worker-gpus 4 needs 8 GPUs; the Ray cluster has 4"):
        check_room(Placement(2, gpus=4, flag="--replicas"), {"CPU": 64.0, "GPU": 4.0})
    check_room(Placement(2, cpus=8, gpus=1), {"CPU": 16.0, "GPU": 2.0})


def test_an_address_nothing_answers_on_fails_at_once():
    port = free_port()
    with pytest.raises(ValueError, match=f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    check_reachable("auto")  # left to Ray


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="asks Ray's GCS client; ray is not installed")
def test_an_address_where_something_else_listens_fails_in_bounded_time():
    """A port that accepts connections but is no Ray head (``ray.init`` would retry for minutes)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        address = f"127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(ValueError, match=f"--ray-address {address}: something answers there, but not a Ray "
                                             "cluster's head"):
            check_reachable(address, timeout_s=1)
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("argv, message", [
    (["eval", "d.jsonl", "--worker-cpus", "2"], "--worker-cpus: applies to engines on Ray (--workers > 1 or --ray-address)"),
    (["serve", "--worker-gpus", "1"], "--worker-gpus: applies to engines on Ray (--replicas > 1 or --ray-address)"),
    (["eval", "d.jsonl", "--workers", "2", "--worker-gpus", "-1"], "--worker-gpus: must be an integer >= 0, got -1"),
    (["eval", "d.jsonl", "--workers", "2", "--worker-gpus", "1", "--tensor-parallel-size", "2"],
     "--worker-gpus 1: each engine is split over --tensor-parallel-size 2 GPUs; give each worker that many"),
])
def test_ray_flags_without_engines_on_ray_are_refused(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_help_explains_the_ray_options(capsys):
    for command, count in (("eval", "--workers"), ("serve", "--replicas")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for option in (count, "--ray-address", "--worker-cpus", "--worker-gpus", "pip install 'pfengine[ray]'",
                       "ray start --head"):
            assert option in text, (command, option)


@pytest.mark.parametrize("argv, message", [
    (["eval", "d.jsonl", "--workers", "0"], "argument --workers: must be positive, got 0"),
    (["serve", "--replicas", "-1"], "argument --replicas: must be positive, got -1"),
    (["eval", "d.jsonl", "--workers", "two"], "argument --workers: expected an integer, got 'two'"),
    (["eval", "d.jsonl", "--workers", "1.5"], "argument --workers: expected an integer, got '1.5'"),
    (["serve", "--replicas", "2", "--worker-gpus", "one"], "argument --worker-gpus: invalid int value: 'one'"),
])
def test_worker_counts_are_positive_integers(capsys, argv, message):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


WITHOUT_RAY = """
import importlib.abc, sys

class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoRay())
"""


def without_ray(tmp_path: Path, code: str, *args: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter in which ``import ray`` (or any ``ray.*``) fails, as where
    Ray is not installed."""
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY + code, *args], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=300)


def test_pfengine_works_without_ray(tmp_path):
    """The package, the server, eval, ``pfengine --help`` and a PF request on the engine need no Ray."""
    code = """
import pfengine, pfengine.server, pfengine.eval.runner
from pfengine.cli import main
from pfengine.config import EngineConfig, Request, SamplingParams, SearchParams
from pfengine.engine import Engine
from pfengine.toy.pf import PRM, PRM_CONFIG, POLICY
try:
    main(["--help"])
except SystemExit as e:
    assert e.code == 0
engine = Engine(EngineConfig(model=str(POLICY), prm=str(PRM), prm_config=PRM_CONFIG))
[result] = engine.generate([Request("Start with 4. Add 3. What is the result?", SamplingParams(seed=0, max_steps=4),
                                 SearchParams(method="particle_filter", n_particles=4))])
assert len(result.particles) == 4 and result.answer is not None, result
assert not any(name == "ray" or name.startswith("ray.") for name in sys.modules)
print("no ray: ok")
"""
    out = without_ray(tmp_path, code)
    assert out.returncode == 0 and "no ray: ok" in out.stdout and "usage: pfengine" in out.stdout, out.stderr


@pytest.mark.parametrize("argv, flag", [(["eval", "p.jsonl", "--workers", "2"], "--workers"),
                                        (["eval", "p.jsonl", "--ray-address", "auto"], "--ray-address"),
                                        (["serve", "--replicas", "2"], "--replicas")])
def test_engines_on_ray_without_ray_say_what_to_install(tmp_path, argv, flag):
    (tmp_path / "p.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n')
    out = without_ray(tmp_path, "from pfengine.cli import main\nsys.exit(main(sys.argv[1:]))", *argv)
    assert out.returncode == 2, out.stderr
    assert f"{flag}: runs engines on Ray, which is not installed: pip install 'pfengine[ray]'" in out.stderr
    assert "Traceback" not in out.stderr
