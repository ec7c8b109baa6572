# experiment only: random erasing (cutout) of a CUT x CUT square in each perturbed copy, after the warp
import sys, json, os
import torch
from tldr_fast import leakage, step
CUT = int(os.environ.get("CUT", "0"))
_orig = step.random_warp
def random_warp(images, cfg, generator, shard=None):
    x = _orig(images, cfg, generator, shard)
    if CUT:
        n, _, h, w = x.shape
        cy = torch.randint(0, h, (n,), generator=generator, device=x.device)
        cx = torch.randint(0, w, (n,), generator=generator, device=x.device)
        ys = torch.arange(h, device=x.device); xs = torch.arange(w, device=x.device)
        my = ((ys[None] - cy[:, None]).abs() <= CUT // 2)  # [n, h]
        mx = ((xs[None] - cx[:, None]).abs() <= CUT // 2)  # [n, w]
        m = (my[:, :, None] & mx[:, None, :])[:, None]  # [n,1,h,w]
        x = torch.where(m, torch.full_like(x, -1.0), x)
    return x
step.random_warp = random_warp
variants = json.loads(sys.argv[2])
seeds = [int(s) for s in sys.argv[4].split(",")]
leakage.run("default", sys.argv[1], variants, targets=sys.argv[3].split(","), seeds=seeds, device="cpu", progress=False, say=print)
