"""Faults a user meets: kill -9 with W&B on, two trainers on one run, Ctrl-C, a full disk, shards whose metadata
lie, collaborators who cannot read files, temporary files of killed writers. Each test reproduces the fault with
real processes, signals, filesystems and shards."""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import make_cfg

from clipgen.errors import ClipgenError
from clipgen.facts import class_folder
from clipgen.models.factory import create_clip
from clipgen.recipes.build import ensure_recipe
from clipgen.train.data import load_train_data
from clipgen.train.loop import run_train
from clipgen.files import STALE_TMP_S, WriteError, atomic_torch_save, atomic_write_json, sweep_stale_dirs
from clipgen.world.generate import generate_world

SMOKE = ("debug=smoke", "recipe=cg_high", "trainer.threads=1")
LONG = ("trainer.epochs=40",)  # long enough that the trainer is still running when the fault comes


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
            children.setdefault(st[1], []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def _in_session(sid: int) -> set[int]:
    """Every process of session ``sid`` (a trainer started with start_new_session: its children keep the session
    after they are reparented)."""
    out = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == sid:
                out.add(int(entry))
    return out


def _alive(pids) -> list[int]:
    """The pids still running (a zombie has exited; it only waits for its parent to collect its status)."""
    return [p for p in pids if (st := _proc_stat(p)) is not None and st[0] != "Z"]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


def _kill_9_and_expect_all_gone(proc: subprocess.Popen, tree: set[int], seconds: float) -> None:
    """kill -9 of ``proc`` alone (as the OOM killer or a preemption would); every process of ``tree`` must be
    gone within ``seconds``."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + seconds
    while _alive(tree) and time.time() < deadline:
        time.sleep(0.2)
    left = _alive(tree)
    assert not left, [f"{p}: {_cmdline(p)}" for p in left]


@contextlib.contextmanager
def _processes_of(proc: subprocess.Popen):
    """The set to fill with ``proc``'s descendants; on the way out ``proc`` and any of them still alive are killed
    (after a failure: the processes this test started)."""
    tree: set[int] = set()
    try:
        yield tree
    finally:
        proc.kill()
        for p in _alive(tree):
            os.kill(p, signal.SIGKILL)


def _start_trainer(root: Path, *overrides: str, umask: int | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.Popen(["clipgen-train", f"paths.root={root}", *SMOKE, *overrides], env=env, cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    if not path.exists():
        proc.kill()
        pytest.fail(f"{path} never appeared:\n" + proc.communicate()[0].decode()[-3000:])


@pytest.fixture
def own_root(tiny_root, tmp_path):
    """A paths.root of the test's own holding a copy of the tiny world (recipes are built in it)."""
    shutil.copytree(Path(tiny_root) / "world", tmp_path / "world")
    return tmp_path


@pytest.mark.slow
def test_kill_9_of_a_streaming_run_with_wandb_leaves_no_process(own_root):
    """W&B's thread makes the loader start its workers from a fork server; before the fix the server, both
    workers (~0.5 GB each) and the resource tracker outlived a kill -9 of the trainer for hours."""
    proc = _start_trainer(own_root, *LONG, "run_name=orphans", "logger=wandb", "logger.mode=offline",
                          "data.loader=stream", "data.workers=2", "trainer.save_every_steps=3")
    with _processes_of(proc) as tree:
        _wait_for(own_root / "runs" / "orphans" / "latest.pt", proc)
        time.sleep(1.0)  # the loader's workers are busy prefetching now
        tree.update(_descendants(proc.pid))
        assert sum("forkserver" in _cmdline(p) for p in tree) >= 3, [_cmdline(p) for p in tree]  # server + 2
        _kill_9_and_expect_all_gone(proc, tree, 20)  # W&B's service notices within a few seconds; workers at once


@pytest.mark.slow
def test_kill_9_while_the_stream_loader_starts_leaves_no_process(own_root):
    """Killed while its loader starts workers from a fork server (W&B on), the trainer used to leave the server, a
    worker and the resource tracker alive for 10-20 s, and the log got an UnpicklingError: the workers were bound
    to their parent only once they had unpickled their task. Killed at the moment the server appears, and again
    a little later, every loader process is gone within 3 s and nothing reads a truncated pickle."""
    for delay in (0.0, 0.4):
        proc = _start_trainer(own_root, *LONG, f"run_name=startup-{delay}", "logger=wandb", "logger.mode=offline",
                              "data.loader=stream", "data.workers=2")
        with _processes_of(proc) as tree:
            deadline = time.time() + 240
            while proc.poll() is None and time.time() < deadline and \
                    not any("forkserver" in _cmdline(p) for p in _descendants(proc.pid)):
                time.sleep(0.01)
            time.sleep(delay)
            session = _in_session(proc.pid)  # the trainer's session: its processes, reparented or not
            loader = {p for p in session if "multiprocessing" in _cmdline(p)}
            assert loader and proc.poll() is None, [_cmdline(p) for p in session]  # the fork server, at least
            os.kill(proc.pid, signal.SIGKILL)
            tree.update(session | _in_session(proc.pid))
            out = proc.communicate()[0].decode()
            def left():
                return _alive([p for p in _in_session(proc.pid) if "multiprocessing" in _cmdline(p)])
            deadline = time.time() + 3
            while left() and time.time() < deadline:
                time.sleep(0.05)
            assert not left(), [f"{p}: {_cmdline(p)}" for p in left()]
            assert "UnpicklingError" not in out and "Traceback" not in out, out[-3000:]


@pytest.mark.slow
def test_kill_9_of_a_study_stops_its_trainers_and_each_saves(own_root):
    """A study trains two runs at a time in its own processes. Before the fix a killed study left them training
    as orphans (a relaunch then met a run still held by its orphan); now each gets SIGTERM, saves latest.pt and
    exits, and a relaunch resumes from there."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    over = [f"paths.root={own_root}", "debug=smoke", *LONG, "study.name=killed", "study.recipes=[cg_low,cg_high]",
            "study.parallel=2", "trainer.save_every_steps=3"]
    log = own_root / "study.log"  # a file, not a pipe: nobody reads a pipe while the study runs
    with open(log, "wb") as f:
        proc = subprocess.Popen(["clipgen-study", *over], env=env, cwd=own_root, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    with _processes_of(proc) as tree:
        deadline = time.time() + 180
        while len(list((own_root / "runs").glob("*/latest.pt"))) < 2 and proc.poll() is None \
                and time.time() < deadline:
            time.sleep(0.2)
        assert len(list((own_root / "runs").glob("*/latest.pt"))) == 2, log.read_text()[-3000:]
        tree.update(_descendants(proc.pid))
        _kill_9_and_expect_all_gone(proc, tree, 30)
        out = log.read_text()
        saved = re.findall(r"received SIGTERM: saved (\S+)/latest.pt at step (\d+)", out)
        assert len(saved) == 2, out[-3000:]
        for run, step in saved:
            assert torch.load(Path(run) / "latest.pt", weights_only=False)["step"] == int(step)


@pytest.mark.slow
def test_second_trainer_is_refused_and_a_dead_holder_releases_the_run(own_root):
    """Two clipgen-train on one run directory: the second fails with one line naming the holder. Once the holder
    is killed, the next trainer takes the run over, sweeps the dead one's temporary files and follows the umask
    (before: both trained to the end; mkstemp's 0600 files; temp files stayed forever)."""
    stale = own_root / "recipes" / ".cg_high-0123456789.tmp-999999"
    stale.mkdir(parents=True)
    (stale / "shard-00000.tar").write_bytes(b"partial")
    os.utime(stale / "shard-00000.tar", (time.time() - STALE_TMP_S - 60,) * 2)
    os.utime(stale, (time.time() - STALE_TMP_S - 60,) * 2)
    over = (*LONG, "run_name=locked")
    run_dir = own_root / "runs" / "locked"
    proc = _start_trainer(own_root, *over, umask=0o027)
    try:
        _wait_for(run_dir / "latest.pt", proc)
        with pytest.raises(ClipgenError, match=rf"'{re.escape(str(run_dir))}' is being trained by pid {proc.pid} "):
            run_train(make_cfg(own_root, *SMOKE, *over))
        assert proc.poll() is None  # the first one trains on
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not stale.exists()  # the recipe build swept the killed build's directory

    for name in ("config.yaml", "meta.json", "latest.pt", "checkpoints/epoch_000.pt"):
        assert (run_dir / name).stat().st_mode & 0o777 == 0o640, name  # umask 027, not mkstemp's 0600
    leftovers = [run_dir / ".latest.pt.k2j4_x.tmp", run_dir / ".meta.json.a1b2.tmp",
                 run_dir / "checkpoints" / ".epoch_002.pt.zz9q.tmp"]
    for p in leftovers:
        p.write_bytes(b"half a checkpoint")
    keep = run_dir / "notes.txt"
    keep.write_text("a user's file")
    # The lock is free again: this trainer takes the run over (and stops at once).
    out = run_train(make_cfg(own_root, *SMOKE, *over, "trainer.max_steps=1"))
    assert out["status"] == "running"
    assert not [p for p in leftovers if p.exists()] and keep.exists()


@pytest.mark.slow
def test_ctrl_c_saves_latest_and_exits_130_with_one_line(own_root):
    """A terminal sends SIGINT to the whole process group (trainer and loader workers). Before: a traceback and
    no latest.pt saved."""
    proc = _start_trainer(own_root, *LONG, "run_name=ctrlc", "data.loader=stream", "data.workers=2",
                          "trainer.save_every_steps=3")
    latest = own_root / "runs" / "ctrlc" / "latest.pt"
    _wait_for(latest, proc)
    tree = _descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("clipgen: received SIGINT")]
    assert len(lines) == 1 and "not requeued" in lines[0], out[-3000:]
    step = int(re.search(r"at step (\d+)/", lines[0]).group(1))
    assert torch.load(latest, weights_only=True)["step"] == step
    time.sleep(1.0)
    assert not _alive(tree)


def _mount_tmpfs(path: Path, size: str):
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.decode().strip()[:100]})")


@pytest.fixture
def small_disk(tmp_path):
    """``mount(name, size)``: a real, small tmpfs at tmp_path/name (needs root; skipped otherwise)."""
    mounted = []

    def mount(name: str, size: str) -> Path:
        path = tmp_path / name
        _mount_tmpfs(path, size)
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.slow
def test_disk_full_during_a_save_is_one_line_and_loses_nothing(own_root, small_disk):
    """runs/ on a 30 MiB disk: epoch_000 (6 MB) and the first latest.pt (19 MB) fit, a later save does not.
    Before: a raw '[enforce fail at inline_container.cc]' traceback that named neither the path nor the disk."""
    runs = small_disk("runs", "30m")
    proc = _start_trainer(own_root, "run_name=full")
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "inline_container" not in out, out[-3000:]
    errors = [ln for ln in out.splitlines() if ln.startswith("clipgen: error:")]
    assert len(errors) == 1 and str(runs / "full") in errors[0] and "free there" in errors[0], out[-3000:]
    names = sorted(p.name for p in (runs / "full").rglob("*"))
    assert not [n for n in names if n.endswith(".tmp")], names
    for p in (runs / "full").rglob("*.pt"):  # every file that is there is whole
        assert "state_dict" in torch.load(p, weights_only=True)


def test_disk_full_while_generating_a_world_is_one_line(tmp_path, small_disk):
    """Before: a raw OSError from deep inside the image writer."""
    small_disk("world", "1m")
    with pytest.raises(ClipgenError, match=r"cannot write world '.*/world/tiny-[0-9a-f]+': No space left on device "
                                           r"\([0-9.]+ [KM]?B free there\)"):
        generate_world(make_cfg(tmp_path, "debug=smoke"))
    assert os.listdir(tmp_path / "world") == []  # the partial build is gone


def test_atomic_writes_follow_the_umask_and_are_durable(tmp_path, monkeypatch):
    """mkstemp makes 0600 files; collaborators on a shared directory must be able to read results. The bytes
    and the rename are both fsynced (before: torch saves were renamed without an fsync)."""
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    old = os.umask(0o027)
    try:
        atomic_torch_save({"state_dict": {"w": torch.zeros(3)}}, tmp_path / "c.pt")
        atomic_write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o640
    assert re.fullmatch(rf"{re.escape(str(tmp_path))}/\.c\.pt\..+\.tmp", synced[0])  # the bytes, before the rename
    assert synced[1] == str(tmp_path)  # the rename itself
    assert sorted(os.listdir(tmp_path)) == ["c.pt", "m.json"]


def test_failed_write_keeps_the_previous_file_and_is_still_an_oserror(tmp_path, small_disk):
    disk = small_disk("disk", "2m")
    atomic_torch_save({"state_dict": {"w": torch.ones(3)}}, disk / "latest.pt")
    with pytest.raises(WriteError, match=r"cannot write checkpoint '.*/latest\.pt': .* \([0-9.]+ MB free there\)"):
        atomic_torch_save({"state_dict": {"w": torch.zeros(1_000_000)}}, disk / "latest.pt")
    with pytest.raises(OSError):  # callers that tolerate an unwritable optional file still catch it
        atomic_write_json(disk / "big.json", list(range(1_000_000)))
    assert torch.equal(torch.load(disk / "latest.pt", weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert os.listdir(disk) == ["latest.pt"]


def test_stale_build_directories_are_swept_by_age(tmp_path):
    old, fresh = tmp_path / ".r-1.tmp-11", tmp_path / ".r-2.tmp-12"
    for d in (old, fresh):
        d.mkdir()
        (d / "shard-00000.tar").write_bytes(b"x")
    past = time.time() - STALE_TMP_S - 60
    os.utime(old / "shard-00000.tar", (past, past))
    os.utime(old, (past, past))
    assert sweep_stale_dirs(tmp_path, ".*.tmp-*") == [old]
    assert fresh.exists() and not old.exists()


def _rewrite_first_sample(shard: Path, change) -> None:
    with tarfile.open(shard) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf if m.isfile()]
    first = members[0][0].name.split(".", 1)[0]
    with tarfile.open(shard, "w") as tf:
        for m, data in members:
            if m.name == f"{first}.json":
                meta = json.loads(data)
                change(meta)
                data = json.dumps(meta).encode()
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data))


@pytest.fixture
def shard_copy(tiny_root, tmp_path):
    """A writable copy of the smoke recipe and its base corpus; (recipe dir, manifest, first shard)."""
    src = ensure_recipe(make_cfg(tiny_root, *SMOKE))
    manifest = json.loads((src / "manifest.json").read_text())
    shutil.copytree(src, tmp_path / src.name)
    base = (src / manifest["base"]["dir"]).resolve()
    shutil.copytree(base, tmp_path / base.name)
    return tmp_path / src.name, manifest, tmp_path / src.name / sorted(manifest["shards"])[0]


def test_leak_guard_derives_domain_and_class_from_the_sample_id(shard_copy):
    """A sample whose json says domain 'real' while its id is a held-out class of the test domain trained to the
    end before: the guard trusted the json's domain and class_name."""
    rdir, manifest, shard = shard_copy
    _, tok = create_clip("clipgen-tiny-rn", 32)
    D, held = manifest["test_domain"], manifest["heldout_classes"][0]
    sid = f"{D}/{class_folder(held)}/{held.replace(' ', '_')}_000001"
    _rewrite_first_sample(shard, lambda m: m.update(sample_id=sid, domain="real", class_name=held))
    with pytest.raises(ClipgenError, match=rf"sample '{re.escape(sid)}' in shard '.*{shard.name}' has \.json domain "
                                           rf"'real', but its sample_id says '{D}'"):
        load_train_data(rdir, tok, 32)
    _rewrite_first_sample(shard, lambda m: m.update(domain=D, class_name="axe" if held != "axe" else "bee"))
    with pytest.raises(ClipgenError, match=rf"\.json class_name '(axe|bee)', but its sample_id says '{held}'"):
        load_train_data(rdir, tok, 32)
    _rewrite_first_sample(shard, lambda m: m.update(class_name=held))  # consistent: the held-out rule applies
    with pytest.raises(ClipgenError, match="held-out class"):
        load_train_data(rdir, tok, 32)
    _rewrite_first_sample(shard, lambda m: m.update(sample_id="00000000"))
    with pytest.raises(ClipgenError, match=r"has sample_id '00000000': expected \{domain\}/\{ClassFolder\}/\{stem\}"):
        load_train_data(rdir, tok, 32)


def test_a_run_refused_at_start_leaves_no_run_directory(own_root):
    """A truncated shard or the leak guard refuses the recipe before training writes anything: the run directory
    the trainer locked is removed again, not left holding only its .lock (a finished run keeps its own)."""
    rdir = ensure_recipe(make_cfg(own_root, *SMOKE))
    manifest = json.loads((rdir / "manifest.json").read_text())
    shard = rdir / sorted(manifest["shards"])[0]
    whole = shard.read_bytes()
    shard.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ClipgenError, match=shard.name):
        run_train(make_cfg(own_root, *SMOKE, "run_name=refused"))
    assert not (own_root / "runs" / "refused").exists()
    shard.write_bytes(whole)
    D, held = manifest["test_domain"], manifest["heldout_classes"][0]
    _rewrite_first_sample(shard, lambda m: m.update(sample_id=f"{D}/{class_folder(held)}/x", domain=D,
                                                    class_name=held))
    with pytest.raises(ClipgenError, match="held-out class"):
        run_train(make_cfg(own_root, *SMOKE, "run_name=refused"))
    assert not (own_root / "runs" / "refused").exists()
