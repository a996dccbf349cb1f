"""Peak GPU and host memory of chapter 7's full profile on a simulated Colab GPU.

Runs the scene-saliency task (:mod:`attnchain.tasks.scene_saliency`) on DINOv2 with registers at
its real 37 x 37 grid, with random weights standing in for the download
(``ATTNCHAIN_WEIGHTS=random``) and the model "on the GPU" under
:mod:`attnchain.testing.strict_cuda`, which accounts every device allocation. After each batch it
prints the peak device memory and the process's resident host memory, so growth per batch shows.

    ATTNCHAIN_WEIGHTS=random python benchmarks/colab_memory.py --n 48 --batch-size 16
"""
import argparse
import os
import resource
import tempfile
import time

os.environ.setdefault("ATTNCHAIN_WEIGHTS", "random")
os.environ.setdefault("ATTNCHAIN_PROFILE", "full")

from attnchain.tasks import scene_saliency as ss  # noqa: E402
from attnchain.testing import strict_cuda  # noqa: E402

GIB = 2 ** 30


def _rss() -> int:
    """Resident host memory of this process now (Linux), in bytes."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="dinov2-reg-vitb14")
    ap.add_argument("--level", default="easy")
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--gpu", default="T4")
    a = ap.parse_args()
    strict_cuda.enable(a.gpu)
    net, pre = ss.load_model(a.model)
    net = net.to("cuda")
    print(f"{a.model} on a simulated {a.gpu}; {a.n} scenes of level {a.level}, "
          f"batch size {a.batch_size}")
    print("scenes  device peak GiB  host RSS GiB  seconds")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as results:
        for n in range(a.batch_size, a.n + a.batch_size, a.batch_size):
            n = min(n, a.n)
            strict_cuda.reset_peak_memory_stats()
            # the runner resumes from the results file: each call computes one new batch
            ss.evaluate(a.model, a.level, n=n, batch_size=a.batch_size, model=(net, pre),
                        results_dir=results, progress=False)
            print(f"{n:6d}  {strict_cuda.max_memory_allocated() / GIB:15.2f}  "
                  f"{_rss() / GIB:12.2f}  {time.perf_counter() - t0:7.0f}", flush=True)
    print(f"host peak (ru_maxrss): "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
