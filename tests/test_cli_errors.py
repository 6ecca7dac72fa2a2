"""Every failure of ``python -m pyvl ...`` is one ``pyvl: error: ...`` line and a non-zero exit, never a
traceback, unless ``--debug`` is given. Each case runs in its own process (all of them at once: each pays for
importing torch)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import GOLDEN

from pyvl.cli import main
from pyvl.errors import ConfigError

MODEL = str(GOLDEN / "v15" / "checkpoint")
IMAGE = str(GOLDEN / "images" / "gradient_800x600.png")
TIMEOUT_S = 240

# A command whose implementation raises something pyvl did not foresee, to exercise the catch-all.
_UNEXPECTED = (
    "import sys, pyvl.cli as cli\n"
    "def boom(args):\n    raise KeyError('surprise')\n"
    "cli.cmd_info = boom\n"
    "sys.exit(cli.main(sys.argv[1:]))\n"
)


def _cases(tmp: str) -> dict[str, list[str]]:
    undecodable = os.path.join(tmp, "not_an_image.png")
    with open(undecodable, "w", encoding="ascii") as f:
        f.write("plain text, not a PNG\n")
    empty = os.path.join(tmp, "empty_model")
    os.makedirs(empty, exist_ok=True)
    chat = ["-m", "pyvl", "chat", "--model", MODEL, "--max-new-tokens", "2"]
    return {
        "seed": chat + ["--seed", "18446744073709551616", "hi"],
        "cuda": chat + ["--device", "cuda", "hi"],  # the processes see no GPU (CUDA_VISIBLE_DEVICES="")
        "device": chat + ["--device", "nonsense", "hi"],
        "missing_image": chat + ["--image", os.path.join(tmp, "missing.png"), "hi"],
        "undecodable_image": chat + ["--image", undecodable, "hi"],
        "bad_model": ["-m", "pyvl", "chat", "--model", empty, "hi"],
        "max_num": chat + ["--image", IMAGE, "--max-num", "0", "hi"],
        "max_new_tokens": ["-m", "pyvl", "chat", "--model", MODEL, "--max-new-tokens", "-3", "hi"],
        "engine_flag": chat + ["--max-num-seqs", "0", "hi"],
        "unexpected": ["-c", _UNEXPECTED, "info", "x"],
        "unexpected_debug": ["-c", _UNEXPECTED, "--debug", "info", "x"],
        "usage": ["-m", "pyvl", "chat", "--max-num", "many", "hi"],
    }


def _run_all(tmp: str) -> dict[str, subprocess.CompletedProcess]:
    env = dict(os.environ, PYVL_CACHE=os.path.join(tmp, "cache"), CUDA_VISIBLE_DEVICES="")
    procs = {
        name: subprocess.Popen(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp,
        )
        for name, argv in _cases(tmp).items()
    }
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += f"\n[timed out after {TIMEOUT_S} s]"
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _run_all(str(tmp_path_factory.mktemp("cli_errors")))


@pytest.mark.parametrize(
    "name, code, match",
    [
        ("seed", 2, "seed=18446744073709551616: expected an integer in 0..9223372036854775807"),
        ("cuda", 2, "device=cuda: no CUDA device is available"),
        ("device", 2, "device='nonsense' is not a torch device"),
        ("missing_image", 2, "missing.png'. no such file"),
        ("undecodable_image", 2, "not_an_image.png'. cannot read image"),
        ("bad_model", 2, "config.json"),
        ("max_num", 2, "max_num=0: expected an integer in 1..40"),
        ("max_new_tokens", 2, "max_new_tokens=-3"),
        ("engine_flag", 2, "--max-num-seqs: max_num_seqs=0: expected an integer in 1..1024"),
        ("unexpected", 1, r"unexpected KeyError: 'surprise' \(run with --debug for the traceback\)"),
    ],
)
def test_failures_are_one_line(results, name, code, match):
    r = results[name]
    assert r.returncode == code, r.stderr
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.startswith("pyvl: error: ")]
    assert len(lines) == 1 and re.search(match, lines[0]), r.stderr
    assert r.stderr.rstrip().endswith(lines[0])  # the error is the last thing said


def test_debug_shows_the_traceback(results):
    r = results["unexpected_debug"]
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr and "KeyError: 'surprise'" in r.stderr
    assert "pyvl: error:" not in r.stderr


def test_debug_lets_a_pyvl_error_through(tmp_path, capsys):
    assert main(["chat", "--model", str(tmp_path), "--do-sample", "--temperature", "nan", "hi"]) == 2
    assert capsys.readouterr().err.startswith("pyvl: error: generation_config temperature=nan")
    with pytest.raises(ConfigError, match="config.json"):
        main(["--debug", "info", str(tmp_path)])


def test_usage_errors_keep_argparse_exit_code(results):
    r = results["usage"]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "usage: pyvl" in r.stderr and "invalid int value: 'many'" in r.stderr
