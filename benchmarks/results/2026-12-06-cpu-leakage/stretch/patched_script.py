# experiment only: each sampled image stretched to the full pixel range [-1, 1] (per image min-max)
import sys, json
import torch
from tldr_fast import leakage
from tldr_fast.invert import Inversion
_orig = Inversion.sample_batches
def sample_batches(self, *a, **k):
    for start, x in _orig(self, *a, **k):
        lo = x.amin(dim=(1, 2, 3), keepdim=True); hi = x.amax(dim=(1, 2, 3), keepdim=True)
        yield start, ((x - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1)
Inversion.sample_batches = sample_batches
variants = json.loads(sys.argv[2])
seeds = [int(s) for s in sys.argv[4].split(",")]
leakage.run("default", sys.argv[1], variants, targets=sys.argv[3].split(","), seeds=seeds, device="cpu", progress=False, say=print)
