"""The data path at the paper's scale: what a launch of the streaming trainer costs as the base corpus grows.

    python benchmarks/loader_scale.py [--sizes 20000,200000,2000000] [--root DIR] [--workers 2] [--sides ...]

For each N, a synthetic img2dataset corpus of N pairs (plain tars of 10,000 samples: ``{key}.jpg`` 32 px,
``{key}.txt``, ``{key}.json``; tiny images, so decoding is a lower bound of real 224-256 px photos) is the base
corpus (``data.base=cc``) of the tiny world's cg_high recipe. Measured, each in its own process as a user runs it:

- build: ``clipgen-recipe`` (the one-time base build: re-encode, shard, index; ``recipe.workers`` processes),
  wall and CPU seconds;
- launches: ``clipgen-train ... data.loader=stream trainer.max_steps=1`` (a new run) and then the same run
  relaunched to step 2 (a resume, as a requeue does), with W&B off (workers forked) and with W&B offline (workers
  from a fork server): seconds from the process start to its first step, the trainer's peak RSS (VmHWM), the
  largest USS of a DataLoader worker (private pages: what each worker costs beyond the shared ones);
- the bytes a worker receives when it starts from a fork server (the pickled dataset the DataLoader sends);
- open_clip's own loader on the same corpus: ``open_clip_train.data.get_wds_dataset`` (webdataset, shard and
  sample shuffle, W workers), seconds from the process start to its first batch, peak RSS, worker USS;
- shards without an index (a recipe built by an older clipgen): the launch that checks every shard once;
- once: decode cost per sample of 224 px JPEG (q95) and PNG, and the base build's cost per img2dataset image
  (256 px JPEG read, resized to 224 px, JPEG q95), one thread.

Every row is printed with the 1-minute load average at its start (this machine is shared; the CPU seconds are what
to compare when the load is high). ``--before other.json`` prints another code version's rows (run the script with
``--json`` and that version on ``PYTHONPATH``) beside; the README extrapolates both to the paper's shapes. Floors
(exit status 1 when missed): the relaunch at the largest N reaches its first step within 1.5x (+10 s) of the
relaunch at the smallest; the trainer's peak RSS grows by at most 64 bytes per extra sample; a worker's pickled
state stays under 1 MB.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import bench_root  # noqa: E402  (sets the offline environment first)

SHARD = 10_000  # img2dataset's default samples per shard
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


# --- the corpus ---------------------------------------------------------------------------------------------------
def make_corpus(out: Path, n: int) -> str:
    """An img2dataset-style corpus of ``n`` pairs (written once, reused); returns its brace pattern."""
    import numpy as np
    from PIL import Image

    from clipgen.recipes.shards import _BLOCK, _RECORD, _add

    shards = (n + SHARD - 1) // SHARD
    pattern = f"{out}/{{{0:05d}..{shards - 1:05d}}}.tar"
    if (out / "done").is_file():
        return pattern
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    pool = []
    for _ in range(64):  # a pool of distinct small photos-like JPEGs
        arr = (rng.random((4, 4, 3)) * 255).astype("uint8")
        buf = io.BytesIO()
        Image.fromarray(arr).resize((32, 32), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        pool.append(buf.getvalue())
    words = ["photo", "dog", "city", "street", "sunset", "red", "car", "people", "beach", "house", "tree", "night"]
    for si in range(shards):
        with open(out / f"{si:05d}.tar", "wb") as f:
            for j in range(si * SHARD, min(n, (si + 1) * SHARD)):
                key = f"{j:09d}"
                caption = f"a {words[j % 12]} of a {words[(j // 12) % 12]} number {j}"
                _add(f, f"{key}.jpg", pool[j % 64])
                _add(f, f"{key}.txt", caption.encode())
                _add(f, f"{key}.json", json.dumps({"key": key, "status": "success", "caption": caption}).encode())
            f.write(bytes(2 * _BLOCK))
            if f.tell() % _RECORD:
                f.write(bytes(_RECORD - f.tell() % _RECORD))
    (out / "done").write_text(str(n))
    return pattern


# --- watching a process tree --------------------------------------------------------------------------------------
def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _uss_kb(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    return sum(int(m) for m in re.findall(r"^Private_(?:Clean|Dirty|Hugetlb):\s+(\d+)", text, re.M))


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                ppid = int(Path(f"/proc/{e}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            out.setdefault(ppid, []).append(int(e))
    return out


def _cmd(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _workers(root: int) -> list[int]:
    """DataLoader workers of ``root``: children with its command line (fork), or the children of its fork server."""
    kids = _children()
    mine = _cmd(root)
    out = []
    for c in kids.get(root, []):
        cmd = _cmd(c)
        if "forkserver" in cmd:
            out += kids.get(c, [])
        elif cmd == mine:
            out.append(c)
    return out


def watch(cmd: list[str], marker: str | None, cwd: Path, timeout: float = 3600) -> dict:
    """Run ``cmd``; seconds until a line matching ``marker`` (None: the exit), the root's peak RSS, the largest
    worker USS, the exit status, CPU seconds of the tree (reaped), the output's tail."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = {"rss_kb": 0, "worker_uss_kb": 0, "workers": 0, "first": None, "lines": []}

    def read():
        for line in proc.stdout:
            out["lines"].append(line.rstrip())
            if marker and out["first"] is None and re.search(marker, line):
                out["first"] = time.perf_counter() - t0
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)  # reaped here: its rusage covers its reaped children
        if pid:
            break
        if time.perf_counter() - t0 > timeout:
            proc.kill()
        out["rss_kb"] = max(out["rss_kb"], _status_kb(proc.pid, "VmHWM"))
        ws = _workers(proc.pid)
        out["workers"] = max(out["workers"], len(ws))
        for w in ws:
            out["worker_uss_kb"] = max(out["worker_uss_kb"], _uss_kb(w))
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(5)
    out.update(seconds=time.perf_counter() - t0, rc=proc.returncode, cpu=usage.ru_utime + usage.ru_stime)
    if out["first"] is None:
        out["first"] = out["seconds"]
    out["tail"] = "\n".join(out.pop("lines")[-15:])
    return out


# --- the sides ----------------------------------------------------------------------------------------------------
def overrides(root: Path, pattern: str, workers: int) -> list[str]:
    return [f"paths.root={root}", "debug=smoke", "recipe=cg_high", "data.base=cc", f"data.cc_shards='{pattern}'",
            "data.loader=stream", f"data.workers={workers}", "trainer.log_every=1", "trainer.epochs=1"]


def pickled_worker_bytes(root: Path, pattern: str, workers: int) -> int:
    """len(pickle) of the dataset a DataLoader worker receives from a fork server, built as the trainer builds it."""
    import open_clip

    from clipgen.config import compose_config
    from clipgen.recipes.build import ensure_recipe
    from clipgen.train import stream

    cfg = compose_config(overrides(root, pattern, workers))
    rdir = ensure_recipe(cfg)
    manifest = json.loads((rdir / "manifest.json").read_text())
    from clipgen.models.factory import register_clipgen_models

    register_clipgen_models()
    _, _, loader = stream.make_loader(cfg, rdir, manifest, open_clip.get_tokenizer(cfg.model.name))
    return len(pickle.dumps(stream._Batches(loader)))


WDS = r"""
import json, sys, time
t0 = time.perf_counter()
from argparse import Namespace
import open_clip
from open_clip_train.data import get_wds_dataset
pattern, n, workers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
args = Namespace(train_data=pattern, train_num_samples=n, seed=0, dataset_resampled=False,
                 train_data_upsampling_factors=None, batch_size=32, workers=workers, world_size=1)
info = get_wds_dataset(args, open_clip.image_transform(32, is_train=True), True,
                       tokenizer=open_clip.get_tokenizer("RN50"))
images, texts = next(iter(info.dataloader))
print("first batch", images.shape[0], f"{time.perf_counter() - t0:.2f}", flush=True)
"""


def encode_cost(tmp: Path, n: int = 128) -> dict:
    """ms per sample, one thread, of what the base build does with an img2dataset image (256 px JPEG): read,
    decode, resize to 224 px, encode as JPEG q95 (clipgen.recipes.shards.encode_image)."""
    import numpy as np
    from PIL import Image

    from clipgen.recipes.shards import encode_image

    rng = np.random.default_rng(1)
    tmp.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(16):
        base = Image.fromarray((rng.random((16, 16, 3)) * 255).astype("uint8")).resize((256, 256), Image.BICUBIC)
        arr = np.clip(np.asarray(base, dtype=np.int16) + rng.integers(-6, 7, (256, 256, 3)), 0, 255).astype("uint8")
        path = tmp / f"{i}.jpg"
        Image.fromarray(arr).save(path, format="JPEG", quality=90)
        paths.append(str(path))
    best = float("inf")
    for _ in range(3):
        t = time.process_time()
        for k in range(n):
            encode_image(paths[k % len(paths)], 224, "jpg", 95)
        best = min(best, time.process_time() - t)
    return {"ms": best / n * 1e3, "load": os.getloadavg()[0]}


def decode_costs(n: int = 256) -> dict:
    """ms per image, one thread: decoding 224 px JPEG (q95, as the paper presets' recipes) and PNG."""
    import numpy as np
    from PIL import Image

    from clipgen.data.imagecodec import decode_rgb

    rng = np.random.default_rng(0)
    raws = {"jpg": [], "png": []}
    for _ in range(32):  # smooth photo-like content: upsampled noise plus a little grain
        base = Image.fromarray((rng.random((14, 14, 3)) * 255).astype("uint8")).resize((224, 224), Image.BICUBIC)
        arr = np.clip(np.asarray(base, dtype=np.int16) + rng.integers(-6, 7, (224, 224, 3)), 0, 255).astype("uint8")
        for fmt, kw in (("jpg", {"format": "JPEG", "quality": 95}), ("png", {"format": "PNG", "compress_level": 6})):
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, **kw)
            raws[fmt].append(buf.getvalue())
    out = {"load": os.getloadavg()[0]}
    for fmt, items in raws.items():
        best = float("inf")
        for _ in range(3):
            t = time.process_time()
            for k in range(n):
                decode_rgb(items[k % len(items)])
            best = min(best, time.process_time() - t)
        out[fmt] = {"ms": best / n * 1e3, "kB": sum(map(len, items)) / len(items) / 1e3}
    return out


def one_size(root: Path, n: int, workers: int, sides: set[str], repeats: int = 1) -> dict:
    pattern = make_corpus(root / f"corpus-{n}", n)
    over = overrides(root, pattern, workers)
    row = {"n": n, "load": os.getloadavg()[0]}
    if "build" in sides:
        r = watch(["clipgen-recipe", *over], None, root)
        assert r["rc"] == 0, r["tail"]
        row["build"] = {k: r[k] for k in ("seconds", "cpu", "rss_kb")}
        print(f"N={n}: build {r['seconds']:.1f} s wall, {r['cpu']:.1f} s CPU, peak RSS {r['rss_kb'] / 1e3:.0f} MB",
              flush=True)
    for method, logger in (("fork", ["logger=none"]), ("forkserver", ["logger=wandb", "logger.mode=offline"])):
        if method not in sides:
            continue
        tries: dict[str, list[dict]] = {"first": [], "relaunch": []}
        for attempt in range(repeats):  # a new run to step 1, then its resume to step 2, `repeats` times
            for launch, steps in (("first", 1), ("relaunch", 2)):
                load = os.getloadavg()[0]
                r = watch(["clipgen-train", *over, *logger, f"run_name=scale-{method}", f"trainer.max_steps={steps}"],
                          rf"step {steps}/", root)
                assert r["rc"] == 0, r["tail"]
                tries[launch].append({**{k: r[k] for k in ("first", "seconds", "cpu", "rss_kb", "worker_uss_kb",
                                                           "workers")}, "load": load})
                print(f"N={n}: {method:10s} {launch:8s} first step {r['first']:6.1f} s (exit {r['seconds']:.1f} s, "
                      f"CPU {r['cpu']:.1f} s), trainer peak RSS {r['rss_kb'] / 1e3:6.0f} MB, worker USS "
                      f"{r['worker_uss_kb'] / 1e3:5.0f} MB ({r['workers']} seen), load {load:.2f}", flush=True)
            shutil.rmtree(root / "runs" / f"scale-{method}", ignore_errors=True)
        for launch, rs in tries.items():  # the fastest try (least disturbed), with the median peak memory
            best = dict(min(rs, key=lambda r: r["first"]))
            for k in ("rss_kb", "worker_uss_kb"):
                best[k] = sorted(r[k] for r in rs)[len(rs) // 2]
            row[f"{method} {launch}"] = best
    if "check" in sides:  # shards without an index (an older clipgen's recipes): the one-time check, then a launch
        from clipgen.data.sampleindex import INDEX_PREFIX

        for d in (root / "recipes").iterdir():
            for ix in d.glob(f"{INDEX_PREFIX}*"):
                shutil.rmtree(ix)
        load = os.getloadavg()[0]
        r = watch(["clipgen-train", *over, "logger=none", "run_name=scale-check", "trainer.max_steps=1"],
                  r"step 1/", root)
        assert r["rc"] == 0, r["tail"]
        row["fork check"] = {**{k: r[k] for k in ("first", "seconds", "cpu", "rss_kb", "worker_uss_kb", "workers")},
                             "load": load}
        print(f"N={n}: no index yet: first step {r['first']:6.1f} s (CPU {r['cpu']:.1f} s) after checking every "
              f"shard once, trainer peak RSS {r['rss_kb'] / 1e3:6.0f} MB, load {load:.2f}", flush=True)
        shutil.rmtree(root / "runs" / "scale-check", ignore_errors=True)
    if "pickle" in sides:
        row["pickled"] = pickled_worker_bytes(root, pattern, workers)
        print(f"N={n}: a fork-server worker receives {row['pickled'] / 1e3:.1f} kB", flush=True)
    if "wds" in sides:
        load = os.getloadavg()[0]
        shards = sorted((root / f"corpus-{n}").glob("*.tar"))
        r = watch([sys.executable, "-c", WDS, "::".join(map(str, shards)), str(n), str(workers)], "first batch",
                  root)
        assert r["rc"] == 0, r["tail"]
        row["wds"] = {**{k: r[k] for k in ("first", "cpu", "rss_kb", "worker_uss_kb", "workers")}, "load": load}
        print(f"N={n}: open_clip webdataset first batch {r['first']:6.1f} s, peak RSS {r['rss_kb'] / 1e3:6.0f} MB, "
              f"worker USS {r['worker_uss_kb'] / 1e3:5.0f} MB, load {load:.2f}", flush=True)
    return row


def fit(xs, ys) -> tuple[float, float]:
    """Least-squares a + b x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


LAUNCHES = ("fork first", "fork relaunch", "forkserver first", "forkserver relaunch", "fork check", "wds")


def _cell(v: dict) -> str:
    return (f"{v['first']:5.1f} s wall @{v['load']:4.1f}, {v['cpu']:5.1f} s CPU, RSS {v['rss_kb'] / 1e3:5.0f} MB, "
            f"worker {v['worker_uss_kb'] / 1e3:4.0f} MB")


def report(rows: list[dict], costs: dict | None, label: str = "", before: list[dict] | None = None) -> int:
    ok = True
    ns = [r["n"] for r in rows]
    print(f"\n== {label}to the first step: wall seconds (@ 1-min load), CPU seconds of the process tree, trainer peak "
          "RSS, largest worker USS ==")
    for key in LAUNCHES:
        for r in rows:
            if key in r:
                print(f"{key:20s} N={r['n']:>9,}: {_cell(r[key])}")
        for r in before or []:
            if key in r:
                print(f"{'  before: ' + key:20s} N={r['n']:>9,}: {_cell(r[key])}")
    for r in rows:
        if "build" in r:
            b = r["build"]
            print(f"{'build (one time)':20s} N={r['n']:>9,}: {b['seconds']:6.1f} s wall, {b['cpu']:6.1f} s CPU, "
                  f"peak RSS {b['rss_kb'] / 1e3:5.0f} MB")
    if all("pickled" in r for r in rows):
        print("pickled per worker   " + "  ".join(f"N={r['n']:,}: {r['pickled']:,} B" for r in rows))
        ok &= all(r["pickled"] < 1_000_000 for r in rows)
    if before and all("pickled" in r for r in before):
        print("  before              " + "  ".join(f"N={r['n']:,}: {r['pickled']:,} B" for r in before))
    print("\n== growth with N (least squares over the sizes) and the floors ==")
    for key in ("fork relaunch", "forkserver relaunch"):
        if len(rows) < 2 or not all(key in r for r in rows):
            continue
        _, cb = fit(ns, [r[key]["cpu"] for r in rows])
        _, rb = fit(ns, [r[key]["rss_kb"] * 1024 for r in rows])
        _, ub = fit(ns, [r[key]["worker_uss_kb"] * 1024 for r in rows])
        print(f"{key:20s} CPU {cb * 1e6:+.2f} s per 1M samples; trainer RSS {rb:+.1f} B/sample; worker USS "
              f"{ub:+.1f} B/sample")
        small, large = rows[0][key], rows[-1][key]
        floor = 1.5 * small["first"] + 10
        grow = (large["rss_kb"] - small["rss_kb"]) * 1024 / (rows[-1]["n"] - rows[0]["n"])
        ok &= large["first"] <= floor and grow <= 64
        print(f"{'':20s} floors: first step at N={rows[-1]['n']:,} {large['first']:.1f} s <= 1.5 x "
              f"{small['first']:.1f} "
              f"+ 10 = {floor:.1f} s ({'met' if large['first'] <= floor else 'NOT met'}); trainer RSS growth "
              f"{grow:+.1f} B/sample <= 64 ({'met' if grow <= 64 else 'NOT met'})")
    if len(rows) >= 2 and all("build" in r for r in rows):
        a, b = fit(ns, [r["build"]["cpu"] for r in rows])
        _, mb = fit(ns, [r["build"]["rss_kb"] * 1024 for r in rows])
        print(f"build (32 px, copied) CPU {a:.0f} s + {b * 1e6:.0f} s per 1M samples; builder RSS {mb:+.0f} B/sample")
    if costs:
        d = costs.get("decode")
        if d:
            print(f"decode per sample, one thread (load {d['load']:.2f}): 224 px JPEG q95 {d['jpg']['ms']:.2f} ms "
                  f"({d['jpg']['kB']:.0f} kB), PNG {d['png']['ms']:.2f} ms ({d['png']['kB']:.0f} kB)")
        e = costs.get("encode")
        if e:
            print(f"base build of an img2dataset image (256 px JPEG -> 224 px JPEG q95), one thread (load "
                  f"{e['load']:.2f}): {e['ms']:.2f} ms a sample")
    return 0 if ok else 1


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,200000,2000000")
    ap.add_argument("--root", default=None, help="keep corpora, recipes and runs here (default: a temporary dir)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="launches of each kind (fastest counts, median memory)")
    ap.add_argument("--sides", default="build,fork,forkserver,check,pickle,wds,decode,encode")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--before", default=None, help="a --json file of another code version, printed beside")
    ap.add_argument("--report", default=None, help="only print the report of this --json file")
    args = ap.parse_args()
    before = json.loads(Path(args.before).read_text())["rows"] if args.before else None
    if args.report:
        saved = json.loads(Path(args.report).read_text())
        return report(saved["rows"], saved.get("costs"), before=before)
    sides = {s.strip() for s in args.sides.split(",")}
    with bench_root(args.root, "clipgen-scale-") as root:
        subprocess.run(["clipgen-world", f"paths.root={root}", "debug=smoke"], env=ENV, check=True,
                       stdout=subprocess.DEVNULL)
        rows = [one_size(root, int(n), args.workers, sides, args.repeats) for n in args.sizes.split(",")]
        costs = {"decode": decode_costs() if "decode" in sides else None,
                 "encode": encode_cost(root / "encode") if "encode" in sides else None}
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "costs": costs}, indent=1))
    return report(rows, costs, before=before)


if __name__ == "__main__":
    sys.exit(main())
