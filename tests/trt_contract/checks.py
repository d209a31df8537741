"""One combination of the TensorRT contract suite (run by scripts/trt-contract in a subprocess).

    python tests/trt_contract/checks.py ENGINE_DIR WORK_DIR

REAL: the tensorrt binding on PYTHONPATH (its native libraries are stand-ins that abort if
reached), polygraphy, cuda-python's runtime module, onnx/onnxruntime, and the project's
`deedsr.engines.build_plans` and `deedsr.runtime.backends.trt.TrtBackend` (through the
Upscaler). FAKED: only the GPU side, in fake_gpu.py, held to the real binding's API.

Prints one line per check ("PASS name" / "FAIL name: why") and a JSON summary last; exits 1
when a check failed.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS: list[tuple[str, bool, str]] = []


def check(name):
    def run(fn):
        started = time.perf_counter()
        try:
            fn()
        except Exception as e:  # a failed check, reported on one line (the traceback tail on stderr)
            tb = traceback.extract_tb(e.__traceback__)[-3:]
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb))
            RESULTS.append((name, False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} [{where}]"))
            print(f"FAIL {name}: {RESULTS[-1][2]}", flush=True)
        else:
            RESULTS.append((name, True, ""))
            print(f"PASS {name} ({time.perf_counter() - started:.1f} s)", flush=True)
        return fn
    return run


def main() -> int:
    engine_dir, work = Path(sys.argv[1]), Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.ERROR)
    import tensorrt as trt

    binding = Path(sys.modules[trt.Builder.__module__].__file__).resolve()
    expected = os.environ.get("TRT_CONTRACT_BINDING")
    assert expected is None or binding == Path(expected).resolve(), (binding, expected)
    import fake_gpu
    from api_contract import VIOLATIONS

    fake_gpu.install(trt)
    from deedsr.runtime.backends import cuda as backend_cuda

    real_runtime = backend_cuda.cudart_graphs()  # the REAL cuda-python runtime module (or None)
    graphs_fake = fake_gpu.install_cuda_python(real_runtime) if real_runtime is not None else None

    import polygraphy
    from deedsr.engines.build import BuildOptions, build_plans
    from deedsr.engines.errors import BuildError
    from deedsr.engines.modes import at_least, choose_mode
    from deedsr.runtime.contract import GRAPH_ORDER, PER_STEP
    from deedsr.runtime.manifest import Manifest
    from deedsr.runtime.plans import plan_records

    version = trt.__version__
    v10, v11 = at_least(version, (10,)), at_least(version, (11,))
    quiet = lambda msg: None  # noqa: E731

    def fresh(name: str) -> Path:
        dest = work / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(engine_dir, dest)
        return dest

    def plans_of(root: Path) -> dict:
        data = json.loads((root / "manifest.json").read_text())
        return plan_records(data)

    def fake_plan(root: Path, graph: str) -> dict:
        return json.loads((root / "trt" / f"{graph}.plan").read_text())

    graphs = [g for g in GRAPH_ORDER if g in json.loads((engine_dir / "manifest.json").read_text())["graphs"]]
    modes = ["auto", "fp32"] + (["fp16-flag"] if not v11 else []) + (["strongly-typed"] if v10 else [])
    built: dict[str, Path] = {}

    for mode in modes:
        @check(f"build --mode {mode}: every graph, records and fake plans agree")
        def _():
            root = fresh(f"mode-{mode}")
            out = build_plans(root, BuildOptions(mode=mode), echo=quiet)
            assert [b.graph for b in out] == graphs and not any(b.skipped for b in out)
            want = choose_mode(version, mode)
            records = plans_of(root)
            for graph in graphs:
                rec, plan = records[graph], fake_plan(root, graph)
                assert rec["tensorrt"] == version and rec["mode"] == want.name, rec["mode"]
                assert plan["strongly_typed"] == want.strongly_typed, (graph, plan["strongly_typed"])
                assert plan["fp16_flag"] == want.fp16_flag and plan["tf32"] is False
                assert plan["profile"] == rec["profile"], graph
                assert plan["source"].endswith(rec["source"]["file"]), (plan["source"], rec["source"])
            if want.fp16_flag and want.fp32_islands:
                unet = fake_plan(root, "unet")
                assert unet["pinned_layers"] > 0 and unet["prefer_precision_constraints"], unet["pinned_layers"]
            built[mode] = root

    @check("plans, timing cache and the rewritten manifest.json are readable by others (0644)")
    def _():
        root = built["auto"]
        files = [root / "manifest.json"] + sorted((root / "trt").iterdir())
        bad = [f"{p.name} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in files
               if not p.name.startswith(".") and stat.S_IMODE(p.stat().st_mode) & 0o044 != 0o044]
        assert not bad, bad

    @check("timing cache: written by the first build, loaded by the next (--force)")
    def _():
        root = built["auto"]
        caches = sorted((root / "trt").glob("timing-*.cache"))
        assert len(caches) == 1, caches
        assert "-NVIDIA-Contract-Stand-in" in caches[0].name or "contract" in caches[0].name.lower(), caches[0].name
        written = caches[0].read_bytes()
        assert json.loads(written), "empty timing cache"
        fake_gpu.STATS["timing_cache_loaded"].clear()
        build_plans(root, BuildOptions(force=True, graphs=("unet",)), echo=quiet)
        loaded = fake_gpu.STATS["timing_cache_loaded"]
        assert loaded and loaded[0] == written, "the timing cache was not loaded"
        leftovers = [p.name for p in (root / "trt").iterdir() if p.name.endswith((".lock", ".tmp")) or ".tmp-" in p.name]
        assert not leftovers, leftovers

    @check("--no-timing-cache: neither read nor written")
    def _():
        root = fresh("no-cache")
        fake_gpu.STATS["timing_cache_loaded"].clear()
        build_plans(root, BuildOptions(timing_cache=False, graphs=("adapter", "unet")), echo=quiet)
        build_plans(root, BuildOptions(timing_cache=False, graphs=("unet",), force=True), echo=quiet)
        assert not list((root / "trt").glob("timing-*")) and not fake_gpu.STATS["timing_cache_loaded"]

    @check("second run: every plan up to date, nothing rebuilt")
    def _():
        root = built["auto"]
        before = fake_gpu.STATS["builds"]
        out = build_plans(root, BuildOptions(), echo=quiet)
        assert all(b.skipped for b in out) and fake_gpu.STATS["builds"] == before

    @check("static tiles: per-step profiles fixed to the sampler's tile")
    def _():
        root = fresh("static")
        build_plans(root, BuildOptions(static=True), echo=quiet)
        m = Manifest.load(root)
        tile = m.sampler["tile"]
        for graph, rec in plans_of(root).items():
            if m.graphs[graph].stage == PER_STEP:
                assert rec["static"] and rec["dims"]["tile_height"] == {"min": tile, "opt": tile, "max": tile}
                assert fake_plan(root, graph)["profile"]["x_t" if "x_t" in rec["profile"] else "z_lr"]["min"][2] == tile
        built["static"] = root

    @check("per-step profiles: opt batch is the sampler's usual tiles per call")
    def _():
        root = built["auto"]
        m = Manifest.load(root)
        for graph, rec in plans_of(root).items():
            if m.graphs[graph].stage == PER_STEP:
                assert rec["dims"]["batch"]["opt"] == rec["dims"]["batch"]["max"] == m.max_batch, rec["dims"]["batch"]

    if not v11:
        @check("fp16-flag without fp32 islands pins nothing")
        def _():
            root = fresh("no-islands")
            build_plans(root, BuildOptions(mode="fp16-flag", fp32_islands=False, graphs=("unet",)), echo=quiet)
            plan = fake_plan(root, "unet")
            assert plan["pinned_layers"] == 0 and plan["fp16_flag"]
    else:
        @check("fp16-flag refused on TensorRT 11 with one line")
        def _():
            try:
                build_plans(fresh("refuse"), BuildOptions(mode="fp16-flag"), echo=quiet)
            except BuildError as e:
                assert "removed the FP16 builder flag" in str(e) and "\n" not in str(e)
            else:
                raise AssertionError("no BuildError")

    if at_least(version, (8, 6)):
        @check("--opt-level and --workspace reach the builder config")
        def _():
            root = fresh("opt")
            build_plans(root, BuildOptions(opt_level=2, workspace=1 << 30, graphs=("vae_decoder",)), echo=quiet)
            plan = fake_plan(root, "vae_decoder")
            assert plan["opt_level"] == 2 and plan["pools"] == {str(int(trt.MemoryPoolType.WORKSPACE)): 1 << 30}

    # ------------------------------------------------------------------ backend
    from deedsr.runtime.upscaler import Upscaler
    from PIL import Image

    photo = np.asarray(Image.open(Path(__file__).resolve().parents[2] / "runtime/assets/astronaut_lr.png").convert("RGB"))
    photo = np.ascontiguousarray(photo[:40, :48])
    ort_cache: dict = {}

    def ort_result(precision):
        """The ort backend's upscale on the same graphs: computed by the first combination and
        kept beside the cached engine directory (it depends on nothing TensorRT)."""
        if precision not in ort_cache:
            kept = engine_dir.parent / f"{engine_dir.name}-ort-{precision}-seed5-steps2.npy"
            if kept.is_file():
                ort_cache[precision] = np.load(kept)
            else:
                ref = Upscaler.from_engine_dir(engine_dir, backend="ort", precision=precision)
                ort_cache[precision] = ref.upscale(photo, seed=5, steps=2)
                ref.close()
                tmp = kept.with_name(f".{kept.name}.{os.getpid()}.npy")
                np.save(tmp, ort_cache[precision])
                os.replace(tmp, kept)
        return ort_cache[precision]

    for mode in ("auto", "fp32"):
        @check(f"trt backend ({mode} plans): open, device memory, shapes, execute; equals ort on the same graphs")
        def _():
            root = built[mode]
            up = Upscaler.from_engine_dir(root, backend="trt")
            backend = up.backend
            assert backend.name == "trt" and backend.gpu.name == fake_gpu.GPU_NAME
            source = plan_records(up.manifest.data)["unet"]["source"]["precision"]
            out = up.upscale(photo, seed=5, steps=2)
            up.close()
            ref = ort_result(source)
            assert out.shape == ref.shape and np.array_equal(out, ref), float(np.abs(out.astype(int) - ref).max())

    @check("trt backend: the Upscaler's shape check reaches TrtBackend.check_shapes")
    def _():
        from deedsr.runtime.errors import ShapeError

        up = Upscaler.from_engine_dir(built["static"], backend="trt")
        try:
            tile = up.manifest.sampler["tile"]
            small = np.ascontiguousarray(photo[:16, :16])
            try:
                up.upscale(small, seed=0, steps=1)
            except ShapeError as e:
                assert "static tile" in str(e) and f"--tile {tile}" in str(e), str(e)
            else:
                raise AssertionError("no ShapeError for a tile below the static plans' tile")
        finally:
            up.close()

    if graphs_fake is not None:
        os.environ["DEEDSR_TRT_CUDA_GRAPHS"] = "1"

        for fused in (True, False):
            @check(f"CUDA graphs ({'denoiser' if fused else 'adapter+unet'}): capture once, replay, same result as "
                   "without; nothing leaked")
            def _():
                s = fake_gpu.STATS
                captures, launches = s["captures"], s["launches"]
                up = Upscaler.from_engine_dir(built["static"], backend="trt", use_denoiser=fused)
                assert up.backend.cuda_graphs
                first = up.upscale(photo, seed=5, steps=2)  # captures
                again = up.upscale(photo, seed=5, steps=2)  # replays
                assert up.backend.cuda_graphs, "CUDA graphs were switched off: " + str(s.get("context_errors", [])[-1:])
                source = plan_records(up.manifest.data)["unet"]["source"]["precision"]
                up.close()
                assert s["captures"] > captures and s["launches"] > launches, (s["captures"], s["launches"])
                reference = ort_result(source)  # the same graphs through the ort backend
                assert np.array_equal(first, reference) and np.array_equal(again, reference)
                assert s["graphs_alive"] == 0, s["graphs_alive"]

        @check("CUDA graphs: a failed capture falls back to plain steps and leaks no graph")
        def _():
            fake_gpu.FAIL["capture_enqueue"] = True
            try:
                up = Upscaler.from_engine_dir(built["static"], backend="trt")
                out = up.upscale(photo, seed=5, steps=2)
                assert not up.backend.cuda_graphs
                up.close()
            finally:
                fake_gpu.FAIL["capture_enqueue"] = False
            assert out.shape[0] == photo.shape[0] * 4
            assert fake_gpu.STATS["graphs_alive"] == 0, fake_gpu.STATS["graphs_alive"]

        @check("CUDA graphs: a failed launch is the backend's one-line error")
        def _():
            from deedsr.runtime.errors import BackendError

            up = Upscaler.from_engine_dir(built["static"], backend="trt")
            try:
                up.upscale(photo, seed=5, steps=2)  # captures
                fake_gpu.FAIL["graph_launch"] = True
                try:
                    up.upscale(photo, seed=5, steps=2)
                except BackendError as e:
                    assert "\n" not in str(e) and "CUDA graph" in str(e), str(e)
                else:
                    raise AssertionError("no BackendError")
            finally:
                fake_gpu.FAIL["graph_launch"] = False
                up.close()

        os.environ.pop("DEEDSR_TRT_CUDA_GRAPHS")

        @check("REAL cuda-python without a driver: the backend's graph calls end in its one-line error")
        def _():
            import types

            from deedsr.runtime.backends.trt import TrtBackend, _cuda_error, _driver_hint
            from deedsr.runtime.errors import BackendError

            probe = types.SimpleNamespace(_cudart=real_runtime)  # the unfaked module: 12.x raises, 13.x returns codes
            try:
                err = TrtBackend._graph_call(probe, "cudaGraphLaunch", 0x1234, 0x10)[0]
            except BackendError as e:
                assert "\n" not in str(e) and "DEEDSR_TRT_CUDA_GRAPHS=0" in str(e), str(e)
            else:
                assert int(err) != 0 and _cuda_error(err)
                assert "newer NVIDIA driver" in _driver_hint(err), _cuda_error(err)

    # ------------------------------------------------------------- bad input
    @check("TensorRT present, no NVIDIA driver: build is one line, nothing written; --backend auto uses ort")
    def _():
        from deedsr.runtime.backends import open_backend

        real = backend_cuda._libcuda
        backend_cuda._libcuda = lambda: None
        try:
            root = fresh("no-driver")
            before = (root / "manifest.json").read_bytes()
            try:
                build_plans(root, BuildOptions(), echo=quiet)
            except BuildError as e:
                assert "no NVIDIA driver" in str(e) and "\n" not in str(e), str(e)
            else:
                raise AssertionError("no BuildError")
            assert not (root / "trt").exists() and (root / "manifest.json").read_bytes() == before
            backend = open_backend(Manifest.load(built["auto"]), "auto")
            assert backend.name == "ort", backend.name
            backend.close()
        finally:
            backend_cuda._libcuda = real

    @check("an unsupported polygraphy: one line naming the version to install, nothing written")
    def _():
        real = polygraphy.__version__
        polygraphy.__version__ = "0.49.0"
        try:
            root = fresh("old-polygraphy")
            try:
                build_plans(root, BuildOptions(), echo=quiet)
            except BuildError as e:
                assert "polygraphy 0.49.0 is too old" in str(e) and "polygraphy>=0.53.4" in str(e), str(e)
            else:
                raise AssertionError("no BuildError")
            assert not (root / "trt").exists()
        finally:
            polygraphy.__version__ = real

    @check("the binding without its native libraries: exit 2, one line naming what to install, nothing written")
    def _():
        import subprocess

        root = fresh("no-libnvinfer")
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep)
                                                 if p and "stand-in" not in p)
        proc = subprocess.run([sys.executable, "-m", "deedsr.engines", str(root)], env=env, capture_output=True,
                              text=True, timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, (proc.returncode, lines[-3:])
        assert "libnvinfer" in lines[0] and "tensorrt-cu12" in lines[0], lines[0]
        assert not (root / "trt").exists()

    @check("every call on a fake fits the real TensorRT / cuda-python API")
    def _():
        assert not VIOLATIONS, VIOLATIONS[:5]

    passed = sum(ok for _, ok, _ in RESULTS)
    print(json.dumps({"tensorrt": version, "polygraphy": polygraphy.__version__,
                      "cuda_python": getattr(real_runtime, "__name__", None), "passed": passed,
                      "failed": len(RESULTS) - passed}))
    return 0 if passed == len(RESULTS) else 1


if __name__ == "__main__":
    sys.exit(main())
