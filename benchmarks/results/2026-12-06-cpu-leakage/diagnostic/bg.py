# diagnostic: is the plain CNN's NN-SSIM held down by a grey background? one inversion, NN-SSIM after
# setting pixels below t (in [0, 1]) to 0, for several t; also a histogram of the pixel values
import sys, json, torch
from pathlib import Path
from tldr_fast import leakage, invert, evaluate
s = leakage.SUITES["default"]; cache = Path("/work/lk/freshcache")
tname = sys.argv[1] if len(sys.argv) > 1 else "mnist-plain_cnn-1000"
t = leakage.Target.parse(tname)
parts = leakage.split(t.data, s)
model = leakage.target(t, parts, s, cache, "cpu", print)
jm = leakage.judge(t.data, parts, s, cache, "cpu", print)
train_set = leakage._training_set(model)
meta = model.tldr_meta
inv = invert(model, meta["num_classes"], tuple(meta["input_shape"]), device="cpu", progress=False, **{**dict(s.invert), "seed": 0})
y = torch.arange(10).repeat_interleave(s.eval_per_class)
x01 = (inv.sample(labels=y) + 1) / 2
torch.save(x01, f"/work/lk/bg-{tname}.pt")
print("hist", torch.histc(x01, 10, 0, 1).div(x01.numel()).tolist())
for th in (0.0, 0.02, 0.05, 0.1, 0.2, 0.3):
    x = torch.where(x01 < th, torch.zeros_like(x01), x01)
    r = evaluate(x, train_set, y, value_range=(0.0, 1.0), classifier=model, eval_classifier=jm, held_out=parts.held_out, device="cpu")
    o = leakage._overall(r)
    print(th, {k: round(o[k], 3) for k in ("attack_accuracy", "nn_ssim_mean", "held_out_ssim_mean", "same_class_ssim_mean")}, flush=True)
