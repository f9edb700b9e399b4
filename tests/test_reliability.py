"""Issue #20 acceptance: every bad input, interrupt, overwrite and race through the real CLI (subprocesses).

Each case runs `python -m fsdeploy.cli` on real files and checks the exit code, that stderr holds exactly one
message line (progress and warning lines aside) naming the input, that there is no traceback, and that
nothing at or beside `--out` changed or was left behind. Signals are sent by the test to its own child.
Data: sklearn's digits (real 8x8 scans, upscaled), matplotlib's sample photo, and two small bundles made
once per session: the shipped 32 px glyph backbone and timm's tiny `test_efficientnet` (fast to export).
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "fsdeploy" / "weights" / "efficientnet_b0_glyphs.safetensors"
TINY = "test_efficientnet"  # timm's test model: exports in seconds
PROGRESS = re.compile(r"^\[\s*\d+\.\d s\] ")


# ----------------------------------------------------------------------------------------------- helpers

def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    env.pop(("FSDEPLOY_TRACEBACK"), None)
    env.update(extra)
    return env


def cli(*args: object, cwd: Path | None = None, timeout: float = 180, **env: str) -> subprocess.CompletedProcess[str]:
    """Run the console entry point as a child process, as a user's shell would."""
    return subprocess.run(
        [sys.executable, "-m", "fsdeploy.cli", *map(str, args)], check=False, capture_output=True, text=True, timeout=timeout,
        env=_env(**env), cwd=cwd,
    )


# Runs many refusal cases through the console entry point (`fsdeploy.cli.main`, as `python -m fsdeploy.cli`
# does) in one child process, each with its own argv, stdout, stderr and exit code: the same path as `cli`
# without paying the torch/onnxruntime import once per case. Only for cases that are refused before any
# work (state a finished command leaves behind in the process could otherwise leak into the next case).
_MANY = r"""
import io, json, sys
cases = json.load(sys.stdin)
from fsdeploy import cli
real_out, real_err, results = sys.stdout, sys.stderr, []
for argv in cases:
    out, err, code = io.StringIO(), io.StringIO(), 0
    sys.argv, sys.stdout, sys.stderr = ["fsdeploy", *argv], out, err
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdout, sys.stderr = real_out, real_err
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
real_out.write(json.dumps(results))
"""


def cli_many(cases: list[tuple[object, ...]], cwd: Path | None = None, children: int = 2,
             timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """`cli(*case)` for every case, in `children` child processes instead of one each (see _MANY)."""
    argvs = [[str(a) for a in case] for case in cases]
    chunks = [argvs[i::children] for i in range(children) if argvs[i::children]]

    def run(chunk: list[list[str]]) -> list[dict[str, object]]:
        r = subprocess.run([sys.executable, "-c", _MANY], input=json.dumps(chunk), check=False, capture_output=True,
                           text=True, timeout=timeout, env=_env(), cwd=cwd)
        assert r.returncode == 0, r.stderr[-3000:]
        return json.loads(r.stdout)

    with ThreadPoolExecutor(len(chunks)) as pool:
        done = list(pool.map(run, chunks))
    results: list[subprocess.CompletedProcess[str]] = [None] * len(argvs)  # type: ignore[list-item]
    for i, chunk_results in enumerate(done):
        for j, res in enumerate(chunk_results):
            results[i + j * len(chunks)] = subprocess.CompletedProcess(argvs[i + j * len(chunks)], res["code"], res["stdout"], res["stderr"])
    return results


def message_lines(stderr: str) -> list[str]:
    """stderr without progress lines and warnings: what the user is told about the outcome."""
    return [ln for ln in stderr.splitlines() if ln.strip() and not PROGRESS.match(ln) and not ln.startswith("warning")]


def assert_refused(r: subprocess.CompletedProcess[str], code: int | tuple[int, ...], *needles: str) -> str:
    """Exit `code`, one message line on stderr containing every needle, no traceback; returns the line."""
    codes = code if isinstance(code, tuple) else (code,)
    assert r.returncode in codes, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = message_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """Every entry under `folder` (hidden ones too) -> (size, sha256 of small files / mtime of large ones)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = (0, os.readlink(p))
        elif p.is_file():
            st = p.stat()
            tag = hashlib.sha256(p.read_bytes()).hexdigest() if st.st_size < 1 << 20 else str(st.st_mtime_ns)
            out[rel] = (st.st_size, tag)
        else:
            out[rel] = (-1, "dir")
    return out


def temps(folder: Path) -> list[str]:
    """fsdeploy temp names (owner-tagged or not) directly in `folder`."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


def write_digits(root: Path, classes: tuple[int, ...], per_class: int, start: int, size: int = 32) -> Path:
    """An ImageFolder of sklearn digits scans (8x8, 16 grey levels), upscaled to `size` px PNGs."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for c in classes:
        idx = np.flatnonzero(d.target == c)[start : start + per_class]
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in idx:
            img = Image.fromarray((d.images[i] * 255 / 16).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
            img.save(root / str(c) / f"{i}.png")
    return root


def huge_png(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims width x height (grey) with a one-row IDAT: PIL refuses it at open, as for a real one."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))
    return path


class ReadOnly:
    """Make a folder unwritable even for root: chattr +i (or a read-only tmpfs), chmod for other users."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.undo: list[list[str]] = []

    def __enter__(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0:
            self.folder.chmod(0o555)
            self.undo.append(["chmod", "755", str(self.folder)])
            return self.folder
        if subprocess.run(["chattr", "+i", str(self.folder)], check=False, capture_output=True).returncode == 0:
            self.undo.append(["chattr", "-i", str(self.folder)])
            return self.folder
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(self.folder)], check=False, capture_output=True).returncode == 0:
            self.undo.append(["umount", str(self.folder)])
            return self.folder
        pytest.skip("running as root without chattr or mount: cannot make a read-only folder")

    def __exit__(self, *exc: object) -> None:
        for cmd in self.undo:
            subprocess.run(cmd, check=False, capture_output=True)


# ----------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Digits support/query folders, the shipped backbone's 32 px bundle, a tiny bundle and a task."""
    from fsdeploy.pipeline.export import export_bundle

    root = tmp_path_factory.mktemp("reliability")
    support = write_digits(root / "support", (0, 1, 7), per_class=5, start=0)
    query = write_digits(root / "query", (0, 1, 7), per_class=2, start=20)
    export_bundle("efficientnet_b0", root / "b32", checkpoint=SHIPPED)  # native 32 px, read from the checkpoint
    with pytest.warns(Warning, match="RANDOM weights"):
        export_bundle(TINY, root / "tiny", img_size=32, validate=False)
    task = root / "task.npz"
    r = cli("adapt", root / "b32", support, "--head", "ncc", "--out", task)
    assert r.returncode == 0, r.stderr
    return {"root": root, "support": support, "query": query, "b32": root / "b32", "tiny": root / "tiny", "task": task}


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    (tmp_path / "w").mkdir()
    return tmp_path / "w"


# ----------------------------------------------------------------------------------------------- 1. exits and overwrites

def test_export_refuses_user_files_and_bundles_without_force(data: dict[str, Path], work: Path) -> None:
    """Issue item 2: a folder of user files, a regular file, a symlink, ., .. and '' are refused; a bundle needs --force."""
    mine = work / "thesis"
    mine.mkdir()
    (mine / "thesis.txt").write_text("three years of work")
    (work / "notes.txt").write_text("keep me")
    old = work / "old"
    shutil.copytree(data["tiny"], old)
    (work / "link").symlink_to(old)
    before = snapshot(work)
    cases = [
        ((mine,), 1, ("thesis", "not an fsdeploy bundle", "thesis.txt")),
        ((work / "notes.txt",), 1, ("notes.txt", "is a file")),
        ((work / "link",), 1, ("link", "symlink")),
        ((old,), 1, ("old", "already holds", "--force", "task artefacts")),
        ((".",), 1, ("'.'", "new name")),
        (("..",), 1, ("'..'",)),
        (("",), 1, ("'.'",)),  # typer reads an empty path as '.'
    ]
    results = cli_many([("export", TINY, "--img-size", "32", "--out", out) for (out,), _, _ in cases], cwd=work)
    for r, (_, code, needles) in zip(results, cases):
        assert_refused(r, code, *needles)
    assert snapshot(work) == before


def test_export_force_replaces_a_bundle_and_says_what_is_lost(data: dict[str, Path], work: Path) -> None:
    """`--force` replaces a bundle whole; the losses (engines, int8, tasks) are reported; random init is warned and recorded."""
    out = work / "bundle"
    shutil.copytree(data["b32"], out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["engines"] = {"engines/features.fake.engine": {}}
    manifest["extra"]["int8"] = {"file": "features.int8.abc.onnx"}
    (out / "manifest.json").write_text(json.dumps(manifest))  # what build + quantize would have added
    r = cli("export", TINY, "--img-size", "32", "--no-validate", "--out", out, "--force", "--json")
    assert r.returncode == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["model"] == TINY and row["random_init"] is True
    assert "1 TensorRT engine" in row["replaced"] and "features.int8.abc.onnx" in row["replaced"] and "adapt" in row["replaced"]
    assert "RANDOM weights" in r.stderr
    assert sorted(p.name for p in work.iterdir()) == ["bundle"]  # nothing beside it, no temp, no old copy
    info = cli("info", out)
    assert info.returncode == 0 and "RANDOM INIT" in info.stdout
    info_json = json.loads(cli("info", out, "--json").stdout)
    assert info_json["source"]["random_init"] is True and info_json["model"] == TINY


def test_adapt_out_checks_come_first(data: dict[str, Path], work: Path) -> None:
    """adapt --out: ., .., '', a folder, a user's file, a read-only folder: refused before any work, nothing changed."""
    (work / "report.npz").write_bytes(b"not a task")
    (work / "sub").mkdir()
    before = snapshot(work)
    b, s = data["b32"], data["support"]
    cases = [(".", ("'.'",)), ("..", ("'..'",)), ("", ("'.'",)), ("sub", ("sub", "is a folder")),
             ("report.npz", ("report.npz", "not an fsdeploy task artefact"))]
    results = cli_many([("adapt", b, s, "--out", c[0]) for c in cases], cwd=work)
    for r, (_, needles) in zip(results, cases):
        assert_refused(r, 1, *needles)
    assert snapshot(work) == before
    with ReadOnly(work / "ro") as ro:
        t0 = time.perf_counter()
        r = cli("adapt", b, s, "--out", ro / "task.npz")
        assert_refused(r, 1, str(ro), "not writable")
        assert time.perf_counter() - t0 < 30
        assert list(ro.iterdir()) == []
        r = cli("export", TINY, "--out", ro / "bundle")
        assert_refused(r, 1, str(ro), "not writable")


# ----------------------------------------------------------------------------------------------- tracebacks -> one line

BAD_OPTIONS = [
    (("export", TINY, "--opset", "5", "--out", "{w}/e"), 2, ("--opset",)),
    (("export", TINY, "--img-size", "-5", "--out", "{w}/e"), 2, ("--img-size",)),
    (("export", TINY, "--img-size", "0", "--out", "{w}/e"), 2, ("--img-size",)),
    (("adapt", "{b}", "{s}", "--batch", "0", "--out", "{w}/t.npz"), 2, ("--batch",)),
    (("adapt", "{b}", "{s}", "--batch", "-3", "--out", "{w}/t.npz"), 2, ("--batch",)),
    (("adapt", "{b}", "{s}", "--threads", "0", "--out", "{w}/t.npz"), 2, ("--threads",)),
    (("adapt", "{b}", "{s}", "--threads", "-2", "--out", "{w}/t.npz"), 2, ("--threads",)),
    (("adapt", "{b}", "{s}", "--steps", "-1", "--adapter", "tsa", "--out", "{w}/t.npz"), 2, ("--steps",)),
    (("adapt", "{b}", "{s}", "--head", "linear", "--head-opt", "distance=cosine", "--out", "{w}/t.npz"), 1, ("distance", "linear", "iters=500")),
    (("adapt", "{b}", "{s}", "--head", "ncc", "--head-opt", "bogus=1", "--out", "{w}/t.npz"), 1, ("bogus", "ncc")),
    (("adapt", "{b}", "{s}", "--head", "linear", "--head-opt", "iters=abc", "--out", "{w}/t.npz"), 1, ("iters=abc", "int")),
    (("adapt", "{b}", "{s}", "--head", "linear", "--head-opt", "iters", "--out", "{w}/t.npz"), 1, ("iters", "KEY=VALUE")),
    (("adapt", "{b}", "{s}", "--head", "nope", "--out", "{w}/t.npz"), 1, ("nope", "simpleshot")),
    (("predict", "{b}", "{t}", "{q}", "--topk", "0"), 2, ("--topk",)),
    (("predict", "{b}", "{t}", "{q}", "--topk", "30"), 1, ("--topk 30", "3 classes")),
    (("predict", "{b}", "{t}", "{q}", "--batch", "0"), 2, ("--batch",)),
    (("bench", "accuracy", "{b}", "--data", "{s}", "--ways", "0"), 2, ("--ways",)),
    (("bench", "accuracy", "{b}", "--data", "{s}", "--queries", "0"), 2, ("--queries",)),
    (("bench", "macs", "{b}", "--shots", "0"), 1, ("--shots", "0")),  # a comma list like bench accuracy and demo
    (("bench", "macs", "{b}", "--ways", "0"), 2, ("--ways",)),
    (("bench", "latency", "{b}", "--iters", "0"), 2, ("--iters",)),
    (("heads", "--ways", "-3"), 2, ("--ways",)),
    (("demo", "--shots", "0", "--workdir", "{w}/demo"), 1, ("--shots", "0")),
    (("demo", "--shots", "a", "--workdir", "{w}/demo"), 1, ("--shots", "'a'")),
    (("info", "{b}", "--nope"), 2, ("--nope",)),
]


def test_bad_options_are_one_line(data: dict[str, Path], work: Path) -> None:
    """Every option value the issue lists: one line naming the option, exit 1 or 2, nothing written."""
    fill = {"b": data["b32"], "s": data["support"], "t": data["task"], "q": data["query"], "w": work}
    before = snapshot(data["root"]), snapshot(work)

    results = cli_many([tuple(a.format(**fill) for a in args) for args, _, _ in BAD_OPTIONS])
    for r, (args, code, needles) in zip(results, BAD_OPTIONS):
        try:
            assert_refused(r, code, *needles)
        except AssertionError as exc:
            raise AssertionError(f"fsdeploy {' '.join(args)}: {exc}") from None
    assert (snapshot(data["root"]), snapshot(work)) == before


def test_bad_files_are_one_line(data: dict[str, Path], work: Path) -> None:
    """Wrong-typed manifest fields, a task with only `schema`, a 400-megapixel PNG, a broken symlink."""
    for field, value in (("graphs", 5), ("files", ["features.onnx"]), ("engines", "x"), ("opset", "17")):
        b = work / f"bundle_{field}"
        b.mkdir()
        m = json.loads((data["b32"] / "manifest.json").read_text())
        m[field] = value
        (b / "manifest.json").write_text(json.dumps(m))
        assert_refused(cli("info", b), 1, "manifest.json", repr(field))
    only_schema = work / "schema_only.npz"
    np.savez(only_schema, schema=np.asarray(1))
    assert_refused(cli("predict", data["b32"], only_schema, data["query"]), 1, "schema_only.npz", "adapt")
    bomb = shutil.copytree(data["support"], work / "bomb")
    huge_png(bomb / "7" / "huge.png", 20000, 20000)
    assert_refused(cli("adapt", data["b32"], bomb, "--out", work / "t.npz"), 1, "huge.png", "megapixels")
    big = shutil.copytree(data["support"], work / "big")
    huge_png(big / "7" / "big.png", 10000, 9500)  # 95 MP: over PIL's warning size, under its refusal size
    r = cli("adapt", data["b32"], big, "--head", "ncc", "--out", work / "big.npz")
    assert r.returncode == 0 and "16 support images" in r.stdout, r.stderr  # decoded (PIL pads the short data) and used
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("warning")] == [
        f"warning: image {big / '7' / 'big.png'} is 10000x9500 (95 megapixels); decoding it takes a lot of memory — downscale it"
    ]
    dead = shutil.copytree(data["support"], work / "dead")
    (dead / "1" / "gone.png").symlink_to(work / "nowhere.png")
    assert_refused(cli("adapt", data["b32"], dead, "--out", work / "t.npz"), 1, "gone.png", "broken symlink")
    assert not (work / "t.npz").exists()


def test_pretrained_offline_check_is_quick(data: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The connectivity check itself (in-process: timm is already imported): an unreachable hub fails at once."""
    from fsdeploy.errors import FsdeployError
    from fsdeploy.exporters.weights_checks import check_hub

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    import fsdeploy.exporters.weights_checks as wc

    monkeypatch.setattr(wc, "_cached", lambda _hub_id: False)  # as on a machine that never downloaded them
    t0 = time.perf_counter()
    with pytest.raises(FsdeployError, match=r"127\.0\.0\.1 is not reachable.*--checkpoint"):
        check_hub("resnet18")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FsdeployError, match="HF_HUB_OFFLINE is set"):
        check_hub("resnet18")
    assert time.perf_counter() - t0 < 10


@pytest.mark.slow
def test_pretrained_offline_fails_in_seconds(work: Path) -> None:
    """`--pretrained` with an unreachable hub: one line with the --checkpoint hint, well before timm's minute of retries."""
    t0 = time.perf_counter()
    r = cli("export", "resnet18", "--pretrained", "--out", work / "b", HF_ENDPOINT="http://127.0.0.1:9")
    assert_refused(r, 1, "resnet18", "127.0.0.1", "--checkpoint")
    assert time.perf_counter() - t0 < 30
    assert list(work.iterdir()) == []


# ----------------------------------------------------------------------------------------------- silent nonsense

def test_nested_class_folders_and_simpleshot(data: dict[str, Path], work: Path) -> None:
    """Images in class sub-folders count for their class; `--head simpleshot` is ncc on cl2n features."""
    nested = shutil.copytree(data["support"], work / "nested")
    (nested / "0" / "session2").mkdir()
    for p in sorted((nested / "0").glob("*.png"))[:3]:
        shutil.copy(p, nested / "0" / "session2" / f"again_{p.name}")
    from fsdeploy.bundle import load_bundle
    from fsdeploy.pipeline.base_mean import add_base_mean

    bundle = shutil.copytree(data["b32"], work / "b32-mean")  # SimpleShot centres on the base-class mean
    add_base_mean(load_bundle(bundle), data["support"])
    r = cli("adapt", bundle, nested, "--head", "simpleshot", "--out", work / "t.npz")
    assert r.returncode == 0, r.stderr
    assert "18 support images" in r.stdout  # 3 classes x 5 + 3 nested
    from fsdeploy.runtime import TaskArtefact

    info = TaskArtefact.load(work / "t.npz").info
    assert (info["head"], info["transform"], info["support"]) == ("ncc", "cl2n", 18)


def test_predict_reports_bad_images_and_classifies_the_rest(data: dict[str, Path], work: Path) -> None:
    imgs = shutil.copytree(data["query"], work / "q")
    (imgs / "1" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    r = cli("predict", data["b32"], data["task"], imgs, "--json", "--batch", "2", "--threads", "1")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    bad = [row for row in rows if "error" in row]
    assert len(rows) == 7 and len(bad) == 1 and bad[0]["image"].endswith("corrupt.png") and "cannot decode" in bad[0]["error"]
    assert_refused(r, 1, "1 unreadable", "corrupt.png")
    r = cli("predict", data["b32"], data["task"], imgs)
    assert_refused(r, 1, "corrupt.png")


def test_exif_orientation_is_applied(data: dict[str, Path], work: Path) -> None:
    """A photo stored sideways with EXIF Orientation=6 decodes as the upright photo (as torchvision/timm users expect)."""
    from fsdeploy.data.images import load_image
    from fsdeploy.data.samples import sample_photo_paths

    photo = Image.open(sample_photo_paths()[0]).convert("RGB")
    upright = photo.crop((0, 0, photo.width, photo.height * 3 // 4)).resize((96, 72))  # landscape, asymmetric
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view": the camera stored the pixels turned 90 CCW
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    stored.save(work / "sideways.png", exif=exif)
    upright.save(work / "upright.png")
    got = np.asarray(load_image(work / "sideways.png"))
    assert got.shape == (72, 96, 3) and np.array_equal(got, np.asarray(upright))
    stored.save(work / "sideways.jpg", exif=exif, quality=95)
    upright.save(work / "upright.jpg", quality=95)
    diff = np.abs(np.asarray(load_image(work / "sideways.jpg"), float) - np.asarray(load_image(work / "upright.jpg"), float))
    assert diff.mean() < 4  # only JPEG block noise
    rows = [json.loads(x) for x in cli("predict", data["b32"], data["task"], work / "sideways.png", work / "upright.png", "--json", "--topk", "3").stdout.splitlines()]
    assert rows[0]["labels"] == rows[1]["labels"] and np.allclose(rows[0]["probs"], rows[1]["probs"], atol=1e-6)


def test_native_size_warning_then_sigterm(data: dict[str, Path], work: Path) -> None:
    """Exporting the 32 px checkpoint at 64 px warns with the native size; SIGTERM then exits 143, old bundle intact."""
    out = work / "bundle"
    shutil.copytree(data["b32"], out)
    before = snapshot(work)
    child = _spawn("export", "efficientnet_b0", "--checkpoint", SHIPPED, "--img-size", "64", "--out", out, "--force")
    lines = _wait_for(child, "trained at 32 px")
    assert any("--img-size 32" in ln for ln in lines)
    child.send_signal(signal.SIGTERM)  # while the model is being built
    rest = child.communicate(timeout=60)[1]
    assert child.returncode == 143, rest
    assert message_lines(rest) == [f"interrupted; nothing written to {out}"]
    assert snapshot(work) == before


# ----------------------------------------------------------------------------------------------- signals

def _spawn(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "fsdeploy.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())


def _wait_for(child: subprocess.Popen[str], needle: str, seen: list[str] | None = None, timeout: float = 120) -> list[str]:
    """Read the child's stderr lines until one contains `needle` (progress lines come plain when not a TTY)."""
    seen = [] if seen is None else seen
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        line = child.stderr.readline()
        if not line:
            raise AssertionError(f"child ended before {needle!r}: {''.join(seen)}")
        seen.append(line.rstrip("\n"))
        if needle in line:
            return seen
    raise AssertionError(f"no {needle!r} within {timeout} s")


def _old_or_new(out: Path, old: dict[str, tuple[int, str]], new_model: str) -> str:
    """`out` is exactly the old bundle, or a complete new one (every hash checked): never a mix."""
    from fsdeploy.bundle import load_bundle

    if snapshot(out) == old:
        return "old"
    assert load_bundle(out).manifest.model == new_model
    return "new"


def _signal_export(data: dict[str, Path], work: Path, sig: signal.Signals, when: str, delay: float) -> None:
    out = work / "bundle"
    shutil.copytree(data["b32"], out)
    old = snapshot(out)
    child = _spawn("export", TINY, "--img-size", "32", "--out", out, "--force")
    _wait_for(child, when)
    time.sleep(delay)
    child.send_signal(sig)
    err = child.communicate(timeout=60)[1]
    state = _old_or_new(out, old, TINY)
    if sig == signal.SIGKILL:
        assert child.returncode == -signal.SIGKILL
    elif state == "old":  # the signal may land after the commit on a fast machine
        assert child.returncode == 128 + sig, err
        assert message_lines(err) == [f"interrupted; nothing written to {out}"], err
        assert temps(work) == []
    # the next run that writes beside `out` removes what a killed one left (its owner pid is gone)
    assert cli("adapt", data["b32"], data["support"], "--head", "ncc", "--out", work / "task.npz").returncode == 0
    assert temps(work) == [] and sorted(p.name for p in work.iterdir()) == ["bundle", "task.npz"]


def test_export_sigterm_cleans_up_like_ctrl_c(data: dict[str, Path], work: Path) -> None:
    """SIGTERM while the bundle is being written (its temp folder exists): exit 143, old bundle whole, no temp left."""
    _signal_export(data, work, signal.SIGTERM, "exporting features.onnx", 0.3)


KILLED_WRITER = """
import os, signal, sys
from fsdeploy.atomic import atomic_dir, atomic_path
kind, target = sys.argv[1], sys.argv[2]
with (atomic_dir(target) if kind == "dir" else atomic_path(target, suffix=".npz")) as tmp:
    (tmp / "features.onnx").write_bytes(b"half") if kind == "dir" else tmp.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_leftovers_are_swept_by_the_next_run(data: dict[str, Path], work: Path) -> None:
    """A writer killed inside atomic_dir/atomic_path leaves its temp; the next CLI run there removes it (pid gone),
    while a live process's temp and files fsdeploy did not make are kept."""
    shutil.copytree(data["tiny"], work / "bundle")
    (work / ".user.tmp").write_text("not ours")
    for kind, target in (("dir", work / "bundle"), ("file", work / "task.npz")):
        r = subprocess.run([sys.executable, "-c", KILLED_WRITER, kind, str(target)], env=_env(), check=False, capture_output=True)
        assert r.returncode == -signal.SIGKILL
    left = temps(work)  # the second writer already swept the first one's folder; its own temp remains
    assert len(left) == 2 and left[0].startswith(".task.npz.p") and left[1] == ".user.tmp", left
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        from fsdeploy import stale

        alive = work / (stale.temp_prefix("other").replace(f"p{os.getpid()}", f"p{live.pid}") + "x.tmp")
        alive.mkdir()
        assert cli("adapt", data["b32"], data["support"], "--head", "ncc", "--out", work / "task.npz").returncode == 0
        assert temps(work) == sorted([".user.tmp", alive.name])
    finally:
        live.kill()
        live.wait()
    from fsdeploy.bundle import load_bundle

    assert load_bundle(work / "bundle").manifest.model == TINY  # the old bundle, whole


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
@pytest.mark.parametrize(("when", "delay"), [("building", 0.5), ("exporting features.onnx", 0.0), ("validating", 0.2), ("validating", 1.5)])
def test_export_signal_matrix(data: dict[str, Path], work: Path, sig, when, delay) -> None:
    _signal_export(data, work, sig, when, delay)


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGKILL])
def test_adapt_interrupted_keeps_old_task(data: dict[str, Path], work: Path, sig) -> None:
    """Ctrl-C used to exit 0: now 130 (143 for SIGTERM) with one line, and the old task stays."""
    out = work / "task.npz"
    shutil.copy(data["task"], out)
    old = snapshot(work)
    big = shutil.copytree(data["support"], work.parent / "big")  # more images, so the signal lands mid-run
    for p in list(big.rglob("*.png")):
        for k in range(6):
            shutil.copy(p, p.with_name(f"{k}_{p.name}"))
    child = _spawn("adapt", data["b32"], big, "--head", "linear", "--head-opt", "iters=30000", "--out", out)
    _wait_for(child, "adapting")
    time.sleep(0.5)
    child.send_signal(sig)
    err = child.communicate(timeout=60)[1]
    if sig == signal.SIGKILL:
        assert child.returncode == -signal.SIGKILL
    else:
        assert child.returncode == 128 + sig, err
        assert message_lines(err) == [f"interrupted; nothing written to {out}"], err
    assert snapshot(work) == old or sig == signal.SIGKILL
    from fsdeploy.runtime import TaskArtefact

    assert TaskArtefact.load(out).info["head"] == "ncc"  # still the old task, whole
    assert cli("adapt", data["b32"], data["support"], "--head", "ncc", "--out", out).returncode == 0
    assert temps(work) == []


# ----------------------------------------------------------------------------------------------- manifest race

def _writer(kind: str, folder: str, barrier, trial: int) -> None:
    """One of two concurrent manifest writers, through the functions `build` and `quantize` commit with."""
    from fsdeploy.engines import build
    from fsdeploy.engines.trt_records import EngineRecord
    from fsdeploy.pipeline import quantize
    from fsdeploy.bundle import load_bundle

    bundle = load_bundle(folder, verify=False)  # as both commands do at their start
    graph = bundle.manifest.graphs["features"].file
    if kind == "build":
        (Path(folder) / "engines").mkdir(exist_ok=True)
        rel = f"engines/features.trial{trial}.engine"
        data = f"engine {trial}".encode()
        (Path(folder) / rel).write_bytes(data)
        record = EngineRecord(
            file=rel, graph="features", sha256=hashlib.sha256(data).hexdigest(), source_onnx=graph,
            source_sha256=bundle.manifest.files[graph], graph_sha256=bundle.manifest.files[graph], backend="tensorrt_rtx",
            backend_version="test", precision="fp32", batch=(1, 1, 1), input_shapes={}, layer_precisions={"fp32": 1},
            precision_source="test",
        )
        barrier.wait()
        build._record_engine(bundle, record)
    else:
        src = Path(folder) / f"int8-{trial}.tmp.onnx"
        src.write_bytes(f"int8 {trial}".encode())
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        report = quantize.QuantReport(
            graph="features", file=f"features.int8.{digest[:12]}.onnx", source_file=graph,
            source_sha256=bundle.manifest.files[graph], calibration_images=1, validation_images=1, validated_on="calibration",
            reduce_range=True, cosine_min=1.0, cosine_mean=1.0, max_abs=0.0, ref_max_abs=1.0, onnxruntime="test",
        )
        barrier.wait()
        quantize._commit(bundle, src, report, digest)
        src.unlink()


def test_parallel_build_and_quantize_records_both_survive(data: dict[str, Path], work: Path) -> None:
    """Issue item 4: an engine record and an int8 record written at once, 20 times: both kept, every listed file present."""
    from fsdeploy.bundle import load_bundle

    folder = work / "bundle"
    shutil.copytree(data["tiny"], folder)
    import fsdeploy.engines.build
    import fsdeploy.pipeline.quantize  # noqa: F401

    ctx = multiprocessing.get_context("fork")  # the children only touch files: no torch threads involved
    for trial in range(20):
        barrier = ctx.Barrier(2)
        procs = [ctx.Process(target=_writer, args=(k, str(folder), barrier, trial)) for k in ("build", "quantize")]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        m = load_bundle(folder).manifest  # verifies every listed file's hash
        assert f"engines/features.trial{trial}.engine" in m.variants, f"trial {trial}: engine record lost"
        (int8,) = m.find_variants("features", kind="onnx", precision="int8")
        assert int8.file in m.files, f"trial {trial}: int8 record lost"
    assert temps(folder) == []


@pytest.mark.slow
def test_parallel_real_build_and_quantize(data: dict[str, Path], work: Path) -> None:
    """The real commands at once (TensorRT-RTX builds on CPU here), 20 trials: both records kept each time."""
    from fsdeploy.bundle import load_bundle

    pytest.importorskip("tensorrt_rtx")
    folder = work / "bundle"
    shutil.copytree(data["tiny"], folder)
    for trial in range(20):
        procs = [
            subprocess.Popen([sys.executable, "-m", "fsdeploy.cli", "build", str(folder), "--profile", "1:2:4", "--force"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env()),
            subprocess.Popen([sys.executable, "-m", "fsdeploy.cli", "quantize", str(folder), "--calib", str(data["support"]), "--iters", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env()),
        ]
        for p in procs:
            assert p.wait(600) == 0, p.stderr.read()
        m = load_bundle(folder).manifest
        assert m.find_variants(kind="trt") and m.find_variants(kind="onnx", precision="int8"), f"trial {trial}"


def test_corrupt_engine_does_not_block_cpu_and_corrupt_int8_says_requantize(data: dict[str, Path], work: Path) -> None:
    """A damaged TensorRT engine only matters to --backend trt; a damaged int8 graph names `fsdeploy quantize`."""
    b = shutil.copytree(data["b32"], work / "bundle")
    m = json.loads((b / "manifest.json").read_text())
    (b / "engines").mkdir()
    (b / "engines" / "features.x.engine").write_bytes(b"corrupted engine")
    m["files"]["engines/features.x.engine"] = "0" * 64
    m["variants"]["engines/features.x.engine"] = {"file": "engines/features.x.engine", "graph": "features", "kind": "trt",
                                                  "precision": "fp32", "graph_sha256": "0" * 64, "sha256": "0" * 64}
    (b / "manifest.json").write_text(json.dumps(m))
    r = cli("predict", b, data["task"], data["query"], "--json")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 6
    (b / "features.int8.abc.onnx").write_bytes(b"damaged")
    m["files"]["features.int8.abc.onnx"] = "0" * 64
    m["variants"]["features.int8.abc.onnx"] = {"file": "features.int8.abc.onnx", "graph": "features", "kind": "onnx",
                                               "precision": "int8", "graph_sha256": "0" * 64, "sha256": "0" * 64}
    (b / "manifest.json").write_text(json.dumps(m))
    assert_refused(cli("predict", b, data["task"], data["query"]), 1, "features.int8.abc.onnx", "fsdeploy quantize")


def test_version_quiet_and_json(data: dict[str, Path]) -> None:
    from fsdeploy import __version__

    r = cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fsdeploy {__version__}"
    r = cli("--quiet", "adapt", data["b32"], data["support"], "--head", "ncc", "--out", data["root"] / "quiet.npz")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    r = cli("info", data["b32"], "--json")
    row = json.loads(r.stdout)
    assert row["model"] == "efficientnet_b0" and row["preprocess"]["input_size"] == [3, 32, 32] and row["source"]["random_init"] is False
    r = cli("adapt", "--help")
    for head in ("linear", "ncc", "simpleshot", "linear-newton", "baseline", "baseline++", "lt-ncc"):
        assert head in r.stdout
    assert "distance=sqeuclidean" in r.stdout and "iters=500" in r.stdout


def test_atomic_dir_without_exchange_parks_the_old_folder_and_sweep_restores_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where renameat2 is missing, the old folder is parked under an owner-tagged name between two renames; if the
    process dies there, the next sweep puts the old folder back instead of deleting it."""
    from fsdeploy import atomic, stale

    target = tmp_path / "bundle"
    target.mkdir()
    (target / "a").write_text("old")
    monkeypatch.setattr(stale, "exchange", lambda a, b: False)
    with atomic.atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
    # the state a SIGKILL between the two renames leaves: no target, the old folder parked by a dead pid
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=False, capture_output=True, text=True)
    parked = tmp_path / (stale.temp_prefix("bundle").replace(f"p{os.getpid()}", f"p{dead.stdout.strip()}") + stale.PARKED_SUFFIX)
    os.replace(target, parked)
    assert stale.sweep(tmp_path) == [parked]
    assert (target / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
