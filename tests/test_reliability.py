"""Reliability of a concept library (issue 6): crash safety under SIGKILL, the integrity check,
resuming an interrupted learn, determinism, concurrent readers and writers, and never reading
pickles or the network.

Real ``cns learn`` processes are forked from one warm worker process (imports paid once): the
worker runs ``cns.cli.main`` in each child and records what the child is doing (training step,
file being saved, ...) in an events file, so a test can kill the child at a chosen or a random
moment with SIGKILL.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cns import ConceptLibrary, ConceptSpec
from cns.cli import main

from .conftest import fast_config
from .test_bad_input import snapshot

SRC = Path(__file__).resolve().parents[1] / "src" / "cns"

# ----------------------------------------------------------------------------- the learn worker
WORKER = textwrap.dedent(r'''
    """Fork server: reads one JSON job a line, forks a child that runs ``cns`` with the job's
    arguments, prints {"pid"} then {"pid", "status"}. Children record events in the job's file."""
    import json, os, sys, time

    import torch
    torch.set_num_threads(1)
    import diffusers, transformers  # noqa: F401  (warm imports shared by every child)
    import cns.cli, cns.generate, cns.library, cns.storage, cns.training
    from diffusers import StableDiffusionPipeline  # noqa: F401

    JOB = {}

    def event(text, pause=0.0):
        with open(JOB["events"], "a") as f:
            f.write(text + "\n")
        hold = JOB.get("hold") or []
        if text in hold:
            go = f"{JOB['events']}.go{hold.index(text)}"
            with open(JOB["events"], "a") as f:
                f.write(f"held {text}\n")
            while not os.path.exists(go):
                time.sleep(0.01)
        elif pause:
            time.sleep(pause)

    def wrap(module, name, label, pause, after=None):
        original = getattr(module, name)
        def wrapper(*args, **kwargs):
            event(label(*args, **kwargs), pause)
            result = original(*args, **kwargs)
            if after:
                event(after(*args, **kwargs), pause)
            return result
        setattr(module, name, wrapper)

    def base(path):
        return os.path.basename(str(path))

    def install_hooks(pause):
        wrap(cns.training, "step_generator", lambda seed, step: f"step {step}", 0.0)
        wrap(cns.generate, "generate_images", lambda *a, **k: "class image", 0.0)
        wrap(cns.library, "_save_checkpoint", lambda folder, key, state: f"checkpoint {state.step}", pause,
             after=lambda folder, key, state: f"checkpoint {state.step} saved")
        wrap(cns.library, "save_file", lambda tensors, path, **k: f"save {base(path)}", pause)
        wrap(cns.library, "fsync_tree", lambda folder: "fsync staging", pause)
        wrap(cns.library, "write_json_atomic", lambda path, data: f"write {base(path)}", pause,
             after=lambda path, data: f"wrote {base(path)}")
        wrap(os, "replace", lambda src, dst: f"replace {base(src)[:9]} -> {base(dst)}", pause)

    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            JOB.update(job)
            out = os.open(job["events"] + ".out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(job["events"] + ".err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(err, 2)
            install_hooks(job.get("pause", 0.0))
            event("start")
            try:
                rc = cns.cli.main(job["args"])
            except BaseException as exc:  # noqa: BLE001
                print(f"worker: {exc!r}", file=sys.stderr)
                rc = 99
            sys.stdout.flush(); sys.stderr.flush()
            event(f"exit {rc}")
            os._exit(rc)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"pid": pid, "status": status}), flush=True)
''')


class LearnWorker:
    """Drives the fork server: ``start`` a ``cns`` command, wait for events, kill, release."""

    def __init__(self, folder: Path):
        self.folder = folder
        script = folder / "worker.py"
        script.write_text(WORKER)
        env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                   TRANSFORMERS_VERBOSITY="error", DIFFUSERS_VERBOSITY="error")
        self.process = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True, env=env, bufsize=1)
        self.jobs = 0

    def start(self, args, pause: float = 0.0, hold=()) -> "Job":
        self.jobs += 1
        events = self.folder / f"job{self.jobs}.events"
        self.process.stdin.write(json.dumps({"args": [str(a) for a in args], "events": str(events),
                                             "pause": pause, "hold": list(hold)}) + "\n")
        self.process.stdin.flush()
        pid = json.loads(self.process.stdout.readline())["pid"]
        return Job(self, pid, events)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


class Job:
    def __init__(self, worker: LearnWorker, pid: int, events: Path):
        self.worker, self.pid, self.events, self.started = worker, pid, events, time.monotonic()
        self.status = None

    def lines(self) -> list[str]:
        return self.events.read_text().splitlines() if self.events.exists() else []

    def wait_for(self, text: str, timeout: float = 120) -> bool:
        """Wait until the child records ``text`` (True) or ends without it (False)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.lines()
            if text in lines:
                return True
            if any(line.startswith("exit ") for line in lines):
                return False
            time.sleep(0.005)
        raise TimeoutError(f"no {text!r} in {self.events}")

    def release(self, index: int = 0):
        Path(f"{self.events}.go{index}").touch()

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def finish(self) -> int:
        """Reap the child; its exit code, or -9 when killed."""
        status = json.loads(self.worker.process.stdout.readline())["status"]
        self.status = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.status

    def stderr(self) -> str:
        path = Path(f"{self.events}.err")
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    worker = LearnWorker(tmp_path_factory.mktemp("worker"))
    yield worker
    worker.close()


# ----------------------------------------------------------------------------- helpers
def leftovers(library: Path) -> list[str]:
    """What a crashed writer may leave: staging, checkpoints, temporary files, unreferenced tasks."""
    found = [p.name for p in library.glob(".staging-*")] + [p.name for p in library.glob(".checkpoint-*")]
    found += [str(p.relative_to(library)) for p in library.rglob("*.tmp")]
    referenced = {t["dir"] for t in json.loads((library / "library.json").read_text())["tasks"]}
    tasks = library / "tasks"
    found += [f"tasks/{p.name}" for p in (tasks.iterdir() if tasks.is_dir() else []) if f"tasks/{p.name}" not in referenced]
    return found


def assert_sound_and_generates(path: Path) -> list[str]:
    """The library opens, passes its integrity check, and draws an image from every token."""
    library = ConceptLibrary(path)
    assert library.verify() == []
    if library.tokens:
        pipe = library.load_pipeline()
        for token in library.tokens:
            image = library.generate(f"a {token}", n=1, steps=2, pipe=pipe)[0]
            assert image.size == (16, 16) and np.isfinite(np.asarray(image, dtype=np.float32)).all()
    return library.tokens


LEARN_ARGS = ["--steps", "12", "--checkpoint-every", "4", "--num-class-images", "2", "--class-image-steps", "2",
              "--quiet"]


# ----------------------------------------------------------------------------- crash safety
@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_or_corrupts_the_library(worker, tmp_path, base_model, concept_folders):
    """22 SIGKILLs of real ``cns learn`` processes, at seeded random moments: half at a uniform
    time over a measured full run, half just before or after a randomly chosen event (training
    step, class image, checkpoint; every other one an event of the task's commit: each file
    saved, the flush, the rename, the manifest). After each kill
    the library is sound, holds exactly the concepts it held before or one more, and every
    token generates; the same learn then run again succeeds and leaves no temporary files."""
    lib = tmp_path / "lib"
    assert main(["init", str(lib), "--model", str(base_model)]) == 0
    rng = random.Random(6)
    classes = ["dog", "hat", "cat", "car", "bird", "tree", "ship", "ring"]
    pause = 0.03  # each save-phase event waits this long, widening the windows a random time can hit

    # a full run, measured: its duration and its events are what the schedule draws from
    calibrate = worker.start(["learn", lib, "--images", concept_folders[0], "--class-word", "robot",
                              "--token", "<c0>", *LEARN_ARGS], pause=pause)
    assert calibrate.finish() == 0, calibrate.stderr()
    full_run = time.monotonic() - calibrate.started
    kill_events = [e for e in calibrate.lines() if e not in ("start", "exit 0")]
    commit_events = [e for e in kill_events
                     if re.search(r"safetensors$|fsync staging|\.staging-|library\.json", e) and "state-" not in e]
    assert len(commit_events) >= 6, commit_events
    assert leftovers(lib) == []

    kills, phases, tokens, concept = 0, {}, ["<c0>"], 1
    started = time.monotonic()
    while kills < 22:
        token = f"<c{concept}>"
        args = ["learn", lib, "--images", concept_folders[concept % 3], "--class-word", classes[concept % len(classes)],
                "--token", token, *LEARN_ARGS]
        job = worker.start(args, pause=pause)
        if kills % 2 == 0:
            time.sleep(rng.uniform(0, full_run))
        elif not job.wait_for(rng.choice(commit_events if kills % 4 == 3 else kill_events)):
            pass  # that event does not happen in this run (e.g. class images already cached): let it finish
        else:
            time.sleep(rng.uniform(0, pause))
        job.kill()
        status = job.finish()
        lines = job.lines()
        if status == -signal.SIGKILL:
            kills += 1
            phase = lines[-1] if lines else "start"
            phase = re.sub(r"\d+", "N", phase.replace("held ", ""))
            phases[phase] = phases.get(phase, 0) + 1
        else:
            assert status == 0, job.stderr()
        held = assert_sound_and_generates(lib)
        assert held in (tokens, tokens + [token]), (held, tokens, lines[-3:])
        if held == tokens + [token]:  # committed (by a finished run, or one killed after its manifest)
            tokens, concept = held, concept + 1
            # no unreferenced task; a staging folder may still hold the class images that move into the
            # cache after the manifest (the next learn removes it)
            assert all(not name.startswith("tasks/") for name in leftovers(lib)), leftovers(lib)
        elif kills % 3 == 0:  # every third kill, the same learn is simply run again to completion
            again = worker.start(args)
            assert again.finish() == 0, again.stderr()
            assert ConceptLibrary(lib).tokens == tokens + [token]
            tokens, concept = tokens + [token], concept + 1
            assert leftovers(lib) == []
    seconds = time.monotonic() - started
    print(f"\n{kills} kills in {seconds:.1f} s (full run {full_run:.2f} s); {len(tokens)} concepts; "
          f"killed during: {json.dumps(phases, sort_keys=True)}")
    # the schedule reached training and saving, not only start-up
    assert any(p.startswith("step") for p in phases)
    assert any(re.search(r"(masks|values|embeddings)\.safetensors$|staging|library\.json", p) for p in phases)
    # a final complete learn removes whatever the last kill left
    final = worker.start(["learn", lib, "--images", concept_folders[0], "--class-word", "dog", "--token", "<final>",
                          *LEARN_ARGS])
    assert final.finish() == 0, final.stderr()
    assert leftovers(lib) == []
    assert assert_sound_and_generates(lib) == tokens + ["<final>"]


# ----------------------------------------------------------------------------- resume and retry
def test_killed_learn_resumes_from_its_checkpoint_bit_identically(worker, capsys, tmp_path, base_model,
                                                                  concept_folders):
    """SIGKILL right after the step-8 checkpoint of a 12-step learn; the same command run again
    resumes at step 8 and stores exactly the tensors of an uninterrupted run."""
    args = ["--images", concept_folders[1], "--class-word", "hat", *LEARN_ARGS]
    libraries = {}
    for name in ("resumed", "uninterrupted"):
        libraries[name] = tmp_path / name
        assert main(["init", str(libraries[name]), "--model", str(base_model)]) == 0
    lib = libraries["resumed"]

    job = worker.start(["learn", lib, *args], hold=["checkpoint 8 saved"])
    assert job.wait_for("held checkpoint 8 saved"), job.stderr()
    job.kill()
    assert job.finish() == -signal.SIGKILL
    assert ConceptLibrary(lib).tokens == [] and ConceptLibrary(lib).verify() == []
    (checkpoint,) = lib.glob(".checkpoint-*")
    assert json.loads((checkpoint / "checkpoint.json").read_text())["step"] == 8

    capsys.readouterr()
    assert main(["learn", str(lib), *map(str, args)]) == 0
    err = capsys.readouterr().err
    assert "warning: resuming the interrupted learn of <new1> from its checkpoint at step 8 of 12" in err
    assert main(["learn", str(libraries["uninterrupted"]), *map(str, args)]) == 0
    assert leftovers(lib) == []
    for file in ("masks.safetensors", "values.safetensors", "embeddings.safetensors"):
        a = load_file(lib / "tasks" / "0001" / file)
        b = load_file(libraries["uninterrupted"] / "tasks" / "0001" / file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
    losses = [json.loads((path / "tasks" / "0001" / "task.json").read_text())["training"]
              for path in libraries.values()]
    assert losses[0]["loss_last"] == losses[1]["loss_last"] and losses[0]["loss_first"] == losses[1]["loss_first"]


def test_a_damaged_checkpoint_is_discarded_with_a_warning(capsys, empty_library, concept_folders):
    lib = empty_library.path
    bogus = lib / ".checkpoint-0123456789abcdef"
    bogus.mkdir()
    (bogus / "checkpoint.json").write_text('{"key": "someone else"')
    capsys.readouterr()
    rc = main(["learn", str(lib), "--images", str(concept_folders[0]), "--class-word", "dog", *LEARN_ARGS])
    assert rc == 0
    assert ConceptLibrary(lib).tokens == ["<new1>"] and leftovers(lib) == []


# ----------------------------------------------------------------------------- concurrency


def test_second_learn_process_is_refused_and_readers_see_the_last_complete_state(worker, capsys, lib, tmp_path,
                                                                                 concept_folders):
    """A real ``cns learn`` process holds the library; a second learn is refused naming its pid,
    while ``show``, ``check`` and ``generate`` work and see the last committed state, also when
    the new task's folder is in place but the manifest not yet replaced."""
    job = worker.start(["learn", lib, "--images", concept_folders[1], "--class-word", "hat", *LEARN_ARGS],
                       hold=["step 2", "write library.json"])
    try:
        assert job.wait_for("held step 2"), job.stderr()
        before = snapshot(lib)
        capsys.readouterr()
        assert main(["learn", str(lib), "--images", str(concept_folders[2]), "--class-word", "cat", *LEARN_ARGS]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"error: library {lib} is being written by another process (pid {job.pid}); "
                       "try again when it has finished")
        assert snapshot(lib) == before

        job.release(0)
        assert job.wait_for("held write library.json"), job.stderr()
        assert (lib / "tasks" / "0002" / "task.json").is_file()  # renamed in, not yet in the manifest
        assert main(["show", str(lib), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        assert [c["token"] for c in shown["concepts"]] == ["<new1>"]
        assert main(["check", str(lib)]) == 0
        assert "1 concept(s)" in capsys.readouterr().out
        assert main(["generate", str(lib), "a <new1> dog", "-n", "1", "--steps", "2", "--out", str(tmp_path / "o")]) == 0
        assert (tmp_path / "o" / "00000.png").is_file()
    finally:
        job.release(0)
        job.release(1)
        status = job.finish()
    assert status == 0, job.stderr()
    assert ConceptLibrary(lib).tokens == ["<new1>", "<new2>"]


# ----------------------------------------------------------------------------- integrity check
def _damage(path: Path, how: str) -> None:
    from safetensors.torch import save_file

    if how == "flip-byte":
        data = bytearray(path.read_bytes())
        data[len(data) * 2 // 3] ^= 0x40
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "delete":
        path.unlink()
    elif how == "wrong-shape":
        if path.suffix == ".json":
            record = json.loads(path.read_text())
            record["concepts"] = record["concepts"] * 2
            path.write_text(json.dumps(record))
            return
        tensors = load_file(path)
        key = sorted(tensors)[0]
        tensors[key] = torch.cat([tensors[key], tensors[key][:1]])
        save_file(tensors, path)


@pytest.mark.parametrize("how", ["flip-byte", "truncate", "delete", "wrong-shape"])
@pytest.mark.parametrize("file", ["task.json", "masks.safetensors", "values.safetensors", "embeddings.safetensors"])
def test_check_names_each_damaged_file(capsys, three_concept_library, file, how):
    library, _ = three_concept_library
    damaged = f"tasks/0002/{file}"
    _damage(library.path / damaged, how)
    problems = ConceptLibrary(library.path).verify()
    assert problems and all(p.startswith("tasks/0002/") for p in problems), problems
    assert any(p.startswith(f"{damaged}: ") for p in problems), problems
    for command in ("check", "show"):
        capsys.readouterr()
        assert main([command, str(library.path)]) == 2
        captured = capsys.readouterr()
        assert f"problem: {damaged}: " in captured.out
        (line,) = captured.err.strip().splitlines()
        assert line.startswith(f"error: library {library.path} failed its integrity check") and damaged in line


def test_check_finds_masks_that_disagree_with_values_even_with_fresh_checksums(capsys, three_concept_library):
    """A mask re-saved with one bit more, its checksum updated in the manifest: only the
    consistency checks (popcount vs values, vs task.json) can tell."""
    from safetensors.torch import save_file

    from cns.sparse import pack_mask, unpack_mask
    from cns.storage import file_sha256

    library, _ = three_concept_library
    path = library.path / "tasks" / "0001" / "masks.safetensors"
    packed = load_file(path)
    key = sorted(packed)[0]
    shape = library.base_model["layers"][key.split("/", 1)[1]]
    mask = unpack_mask(packed[key], shape)
    mask.view(-1)[(~mask).flatten().nonzero()[0]] = True
    packed[key] = pack_mask(mask)
    save_file(packed, path, metadata={"format": "packed-bits-row-major"})
    manifest = json.loads((library.path / "library.json").read_text())
    manifest["tasks"][0]["files"]["masks.safetensors"] = file_sha256(path)
    (library.path / "library.json").write_text(json.dumps(manifest))
    problems = ConceptLibrary(library.path).verify()
    assert any(p.startswith("tasks/0001/masks.safetensors: masks of <new1> hold") for p in problems), problems
    assert any(p.startswith("tasks/0001/values.safetensors:") and "its masks" in p for p in problems), problems


def test_check_on_a_sound_library_and_against_its_base_model(capsys, three_concept_library, base_model):
    library, _ = three_concept_library
    capsys.readouterr()
    assert main(["check", str(library.path), "--base"]) == 0
    out = capsys.readouterr().out
    assert "is sound" in out and "3 concept(s)" in out and "12 files match" in out and "base model matches" in out
    manifest = json.loads((library.path / "library.json").read_text())
    manifest["base_model"]["fingerprint"] = "0" * 64
    (library.path / "library.json").write_text(json.dumps(manifest))
    assert main(["check", str(library.path)]) == 0  # the files alone are sound
    assert main(["check", str(library.path), "--base"]) == 2
    assert "problem: base model:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- determinism
def test_same_inputs_and_seed_give_bit_identical_masks_deltas_and_images(tmp_path, base_model, concept_folders):
    images, tensors = [], []
    for run in ("a", "b"):
        library = ConceptLibrary.create(tmp_path / run, str(base_model))
        library.learn([ConceptSpec(concept_folders[2], "cat")], fast_config(seed=3), progress=False)
        images.append([np.asarray(i) for i in library.generate("a <new1> cat", n=2, steps=3, seed=11)])
        tensors.append({f: load_file(library.path / "tasks" / "0001" / f)
                        for f in ("masks.safetensors", "values.safetensors", "embeddings.safetensors")})
    for f in tensors[0]:
        assert all(torch.equal(tensors[0][f][k], tensors[1][f][k]) for k in tensors[0][f]), f
    assert all(np.array_equal(x, y) for x, y in zip(*images))
    assert not np.array_equal(images[0][0], images[0][1])  # the seeds differ per image


# ----------------------------------------------------------------------------- safety
def test_sources_never_unpickle():
    pattern = re.compile(r"torch\.load\s*\(|\bimport\s+(c?pickle|dill|joblib)\b|\bfrom\s+(c?pickle|dill|joblib)\b|"
                         r"\bpickle\.\w|weights_only\s*=\s*False")
    offenders = [f"{path.relative_to(SRC.parent)}:{n}: {line.strip()}"
                 for path in sorted(SRC.rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_a_model_folder_with_pickled_weights_is_refused(capsys, tmp_path):
    from cns.testing import make_dummy_pipeline

    model = tmp_path / "pickled"
    make_dummy_pipeline().save_pretrained(model, safe_serialization=False)
    assert (model / "unet" / "diffusion_pytorch_model.bin").is_file()  # the UNet as a pickle, nothing else
    assert not list((model / "unet").glob("*.safetensors"))
    capsys.readouterr()
    assert main(["init", str(tmp_path / "lib"), "--model", str(model)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: cannot load base model {str(model)!r}") and "safetensors" in line
    assert not (tmp_path / "lib").exists()


def test_offline_init_learn_generate_never_touch_the_network(monkeypatch, tmp_path, base_model, concept_folders):
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or kwargs)
        raise OSError("network access in an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    lib = tmp_path / "lib"
    assert main(["init", str(lib), "--model", str(base_model)]) == 0
    assert main(["learn", str(lib), "--images", str(concept_folders[0]), "--class-word", "dog", "--steps", "2",
                 "--num-class-images", "1", "--class-image-steps", "1", "--quiet"]) == 0
    assert main(["generate", str(lib), "a <new1> dog", "-n", "1", "--steps", "1", "--out", str(tmp_path / "o")]) == 0
    assert main(["check", str(lib), "--base"]) == 0
    assert attempts == []
