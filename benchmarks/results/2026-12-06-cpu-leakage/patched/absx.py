# experiment only: patches controlled by env: CUT (cutout size on perturbed copies), ADV (FGSM step on
# perturbed copies), PIM (weight of per-image moments prior), L1 (weight of mean [0,1] intensity)
import sys, json, os
import torch, torch.nn.functional as F
from tldr_fast import leakage, step
CUT = int(os.environ.get("CUT", "0")); ADV = float(os.environ.get("ADV", "0"))
ACT = float(os.environ.get("ACT", "0")); PIM = float(os.environ.get("PIM", "0")); L1 = float(os.environ.get("L1", "0"))
state = {}
_sc = step.sample_conditions
def sample_conditions(*a, **k):
    out = _sc(*a, **k); state["y"] = out[2]; return out
step.sample_conditions = sample_conditions
_init = step.TLDRObjective.__init__
def __init__(self, generator, target, *a, **k):
    _init(self, generator, target, *a, **k); state["target"] = target
step.TLDRObjective.__init__ = __init__
_orig = step.random_warp
def random_warp(images, cfg, generator, shard=None):
    x = _orig(images, cfg, generator, shard)
    if CUT:
        n, _, h, w = x.shape
        cy = torch.randint(0, h, (n,), generator=generator, device=x.device)
        cx = torch.randint(0, w, (n,), generator=generator, device=x.device)
        ys = torch.arange(h, device=x.device); xs = torch.arange(w, device=x.device)
        my = ((ys[None] - cy[:, None]).abs() <= CUT // 2); mx = ((xs[None] - cx[:, None]).abs() <= CUT // 2)
        x = torch.where((my[:, :, None] & mx[:, None, :])[:, None], torch.full_like(x, -1.0), x)
    if ADV:
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(state["target"](xd)[0].float(), state["y"]), xd)
        x = (x + ADV * g.sign()).clamp(-1, 1)
    return x
step.random_warp = random_warp
MCD = float(os.environ.get("MCD", "-1"))  # >= 0: the classifier's Dropout layers active in the step (p = MCD, 0: as built)
RD = float(os.environ.get("RD", "0"))  # dropout on every ReLU output of the classifier in the step
_call = step.TLDRObjective.__call__
def __call__(self, s):
    clf = self.target.classifier
    if "hooked" not in state:
        state["hooked"] = True
        state["drop"] = [m for m in clf.modules() if isinstance(m, torch.nn.Dropout)]
        if MCD > 0:
            for m in state["drop"]: m.p = MCD
        if RD:
            for m in clf.modules():
                if isinstance(m, torch.nn.ReLU):
                    m.register_forward_hook(lambda mod, i, o: F.dropout(o, RD, training=True) if state.get("on") else o)
    state["on"] = True
    if MCD >= 0:
        for m in state["drop"]: m.train()
    try:
        return _call(self, s)
    finally:
        state["on"] = False
        for m in state["drop"]: m.eval()
step.TLDRObjective.__call__ = __call__
_lb = step.TLDRObjective._loss_block
def _loss_block(self, logits, feats, x, c, y, w):
    loss, terms = _lb(self, logits, feats, x, c, y, w)
    x01 = (x.float() + 1) / 2
    if PIM and self.target.moments is not None:
        mu, sigma = self.target.moments.to(x01)  # [C]
        var, mean = torch.var_mean(x01, dim=(2, 3), unbiased=False)  # [B, C]
        std = var.clamp_min(1e-6).sqrt()
        loss = loss + PIM * (((mean - mu).square() + (std - sigma).square()) / sigma.square()).mean()
    if L1:
        loss = loss + L1 * x01.mean()
    if ACT:  # DAFL's activation loss: -mean |penultimate features|
        loss = loss - ACT * feats.float().abs().mean()
    return loss, terms
step.TLDRObjective._loss_block = _loss_block
variants = json.loads(sys.argv[2])
seeds = [int(s) for s in sys.argv[4].split(",")]
leakage.run("default", sys.argv[1], variants, targets=sys.argv[3].split(","), seeds=seeds, device="cpu", progress=False, say=print)
