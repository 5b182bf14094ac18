"""The measuring scripts under bench/ run end to end at toy sizes and print what they promise
(their figures mean nothing at these sizes; the point is that the instruments do not rot)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=600, cwd=ROOT):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


def test_score_speed_with_a_sweep(tmp_path):
    here = tmp_path / "cwd"
    here.mkdir()
    out = _run("score_speed.py", "--device", "cpu", "--model", "tiny", "--images", "8", "--samples_per_shard", "4",
               "--batch_size", "4", "--warmup_images", "4", "--sweep", "4g,4cti,4x0x1Tb,4x0x1ms", "--sep_bias", "3",
               "--work_dir", str(tmp_path / "work"), cwd=here)
    lines = out.strip().splitlines()
    ends = re.search(r"new tokens per caption, \[SEP\] included: ([\d.]+) on average", out)
    assert ends and float(ends.group(1)) < 16  # --sep_bias: captions end before max_length
    assert re.fullmatch(r"fast [\d.]+ img/s, reference [\d.]+ img/s, ratio [\d.]+", lines[-1])
    sweep = [ln for ln in lines if ln.startswith("sweep: batch")]
    fastest = re.search(r"^sweep: fastest (4g|4cti|4x0x1Tb|4x0x1ms) at [\d.]+ img/s, against [\d.]+ img/s at the defaults$",
                        out, re.M)
    assert fastest and float(re.search(r"at ([\d.]+) img/s", fastest.group(0)).group(1)) == max(
        float(re.search(r"fast ([\d.]+) img/s", ln).group(1)) for ln in sweep)
    assert len(sweep) == 4 and "CUDA graphs True" in sweep[0] and "CUDA graphs False" in sweep[1]
    torch_threads = re.search(r"torch threads (\d+)\)", out).group(1)  # the device line
    assert f"torch threads {torch_threads}," in sweep[0] and "torch threads 1," in sweep[1]  # t: one
    assert f"torch threads {os.cpu_count()}," in sweep[2]  # T: one per core
    # b: one text forward for a batch's texts (4 images x 9), the text process started again with it
    assert [re.search(r"text batch (\d+),", ln).group(1) for ln in sweep] == ["256", "256", "36", "256"]
    assert all("input stream False" in ln for ln in sweep)  # i: a GPU's only
    # a text process that tokenises (the forward runs in this process, timed), one with the encoder
    assert "text workers 1, " in sweep[2] and "text: MiniLM forward" in sweep[2]
    assert re.search(r"text processes' CPU [\d.]+ ms/image", sweep[2]) and "text processes' CPU" not in sweep[3]
    assert "text workers 1 (with the encoder), " in sweep[3] and "captioning thread False" in sweep[3]
    assert all("image decoding: in line" in ln for ln in sweep)  # the CPU decodes in line
    # this process's threads' CPU, by role: the text threads where the text half runs in a process
    assert re.search(r"this process's threads, CPU seconds in the last round: .*MainThread [\d.]+.* of [\d.]+ s wall",
                     out)
    assert re.search(r"threads' CPU s: .*text [\d.]+.* of [\d.]+ s wall$", sweep[2])
    assert "FAILED" not in out
    assert not any(here.iterdir())  # everything it wrote is under --work_dir, nothing where it ran
    stages = next(ln for ln in lines if ln.startswith("fast (1 round)"))
    for part in ("caption: decoding", "text: token rows -> captions", "text: MiniLM encode", "text_wait"):
        assert part in stages


def test_score_speed_reports_a_failing_sweep_item_and_goes_on(tmp_path):
    out = _run("score_speed.py", "--device", "cpu", "--model", "tiny", "--images", "4", "--samples_per_shard", "4",
               "--batch_size", "4", "--warmup_images", "0", "--sweep=-1,4", "--work_dir", str(tmp_path))
    assert "sweep: -1: FAILED with an exception" in out
    assert re.search(r"^sweep: batch 4, .*img/s", out, re.M)


@pytest.mark.parametrize("script,args,last", [
    ("text_host_cost.py", ["--images", "16"], r"host [\d.]+ ms/image: at most \d+ images/s per text thread"),
    ("gil_cost.py", ["--rounds", "1"], r"tiny BLIP sampling, 1 calls .* in a process [\d.]+ s \([\d.]+x\)"),
    ("pipeline_overhead.py", ["--images", "64", "--batch_size", "16"],
     r"main thread CPU [\d.]+ s = [\d.]+ ms/image: .* [\d.]+ ms/image"),
    # as on a GPU: a text process, each batch captioned on a thread of its own, a stand-in device
    ("pipeline_overhead.py", ["--images", "64", "--batch_size", "16", "--text_workers", "1", "--device_ms", "20",
                              "--overlap_captioning", "1"],
     r"main thread CPU [\d.]+ s = [\d.]+ ms/image: .* [\d.]+ ms/image"),
])
def test_host_cost_scripts(script, args, last):
    assert re.fullmatch(last, _run(script, *args).strip().splitlines()[-1])


def test_gpu_check_runs_what_a_cpu_can(capsys):
    """bench/gpu_check.py's checks, those that mean something on a CPU (the half-precision ones
    are for GPUs), pass here: the instrument for the next GPU session does not rot."""
    from bench import gpu_check

    for check, args in ((gpu_check._tiny_greedy, ()), (gpu_check._candidates_first, ()), (gpu_check._gpu_normalize, ()),
                        (gpu_check._device_resize, (2,)), (gpu_check._text_split, (2,)), (gpu_check._engine, (8,))):
        assert check("cpu", *args), check.__name__
    out = capsys.readouterr().out
    assert out.count("EQUAL to transformers") == 4 and "EQUAL to Pillow's" in out
    assert "embedded here EQUAL to encode: True" in out and "EQUAL to the whole vocabulary's" in out
    assert out.count("store EQUAL to the in-line one: True") == 2 and "images processes (2" in out


def test_decode_profile_runs_on_the_cpu():
    out = _run("decode_profile.py", "--device", "cpu", "--model", "tiny", "--batches", "2,4", "--steps", "2",
               "--repeats", "2", "--top", "5", "--variants")
    steps = re.findall(r"^batch (\d+) \((\d+) sequences\), (defaults|one other way): candidates first (\w+), LM "
                       r"head (not padded|padded to a multiple of 64), graph of (every step|one step), decoder "
                       r"attention (fused|matmul-softmax-matmul): eager step [\d.]+ ms; whole loop [\d.]+ s for 16 "
                       r"new tokens: \d+ images/s of decoding alone$", out, re.M)
    plain = "matmul-softmax-matmul"
    ways = [("defaults", "False", "not padded", "every step", plain),
            ("one other way", "True", "not padded", "every step", plain),
            ("one other way", "False", "padded to a multiple of 64", "every step", plain),
            ("one other way", "False", "not padded", "one step", plain),
            ("one other way", "False", "not padded", "every step", "fused")]
    assert steps == [(b, n) + w for b, n in (("2", "16"), ("4", "32")) for w in ways]  # no graph on the CPU
    verdicts = re.findall(r"^batch (\d+): fastest whole loop: (.+), ([\d.]+) s against the defaults' ([\d.]+) s "
                          r"\(([+-][\d.]+)%\)$", out, re.M)
    assert [v[0] for v in verdicts] == ["2", "4"]
    assert all(float(v[2]) <= float(v[3]) and float(v[4]) <= 0 for v in verdicts)
    ops = re.findall(r"^ +[\d.]+ ms +[\d.]+% +\d+ calls  \[(.+?)\] (\S+)", out, re.M)
    assert len(ops) == 5 and ("matrix products", "aten::addmm") in ops
    shares = re.search(r"^by kind: (.*)$", out, re.M).group(1)
    assert sum(int(x) for x in re.findall(r"\((\d+)%\)", shares)) in range(98, 103)  # every operation counted once


def test_gpu_round_script_runs_its_steps_and_its_sweeps_parse(tmp_path):
    """bench/gpu_round.sh, with a stand-in for python that prints its arguments: every step runs
    and keeps its output, and every --sweep it gives is one score_speed.py accepts."""
    from bench.score_speed import SWEEP_FLAGS, parse_sweep

    out = subprocess.run(["bash", str(ROOT / "bench" / "gpu_round.sh"), str(tmp_path / "out"), "512"],
                         env={**os.environ, "PYTHON": "echo"}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert re.findall(r"^== (\w+): exit 0$", out.stdout, re.M) == ["gpu_check", "decode_profile", "score_speed",
                                                                     "sep_bias"]
    sweeps = re.findall(r"--sweep (\S+)", out.stdout)
    assert len(sweeps) == 4  # two steps, each line printed by the script and by the stand-in
    for text in sweeps:
        items = parse_sweep(text)
        assert items and all(set(flags) <= set(SWEEP_FLAGS) and 1 <= len(n) <= 3 for n, flags in items)
    assert (tmp_path / "out" / "score_speed.txt").read_text().startswith("bench/score_speed.py --device cuda")
    for bad in ("256x12x3q", "256tT"):
        with pytest.raises(ValueError):
            parse_sweep(bad)
