"""Data parallelism on Ray without a cluster: errors that cross from an actor, the placement's checks,
the command-line flags, and pfengine without Ray installed. (The clusters themselves:
``test_dp_eval.py``, ``test_dp_serve.py``.)"""
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

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
    import socket

    with socket.socket() as s:  # a port that was just free
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ValueError, match=f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    check_reachable("auto")  # left to Ray


@pytest.mark.parametrize("argv, message", [
    (["eval", "d.jsonl", "--worker-cpus", "2"], "--worker-cpus: applies to engines on Ray (--workers > 1 or --ray-address)"),
    (["serve", "--worker-gpus", "1"], "--worker-gpus: applies to engines on Ray (--replicas > 1 or --ray-address)"),
    (["eval", "d.jsonl", "--workers", "2", "--worker-gpus", "-1"], "--worker-gpus: must be an integer >= 0, got -1"),
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


def test_worker_counts_are_positive(capsys):
    for argv in (["eval", "d.jsonl", "--workers", "0"], ["serve", "--replicas", "-1"]):
        with pytest.raises(SystemExit):
            main(argv)
        assert "must be positive" in capsys.readouterr().err


def test_pfengine_works_without_ray(tmp_path):
    """The core package, the server and eval import without Ray; asking for workers says what to install."""
    data = tmp_path / "p.jsonl"
    data.write_text('{"problem": "1+1?", "answer": "2"}\n')
    code = ("import sys\nsys.modules['ray'] = None\nimport pfengine, pfengine.server, pfengine.eval.runner\n"
            "from pfengine.cli import main\nsys.exit(main(['eval', sys.argv[1], '--workers', '2']))")
    out = subprocess.run([sys.executable, "-c", code, str(data)], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120)
    assert out.returncode == 2, out.stderr
    assert "--workers: runs engines on Ray, which is not installed: pip install 'pfengine[ray]'" in out.stderr
