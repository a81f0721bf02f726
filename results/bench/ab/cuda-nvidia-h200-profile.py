"""Where the GPU time of fpnlib's R50-FPN inference (800x1333, batch 8) goes, eager and compiled."""
import json, os, sys, torch
from torch.profiler import profile, ProfilerActivity
from fpnlib import bench
from fpnlib.modeling.fast_inference import compile_body, optimized_for_inference
from fpnlib.modeling.torchvision_interop import detect

torch.backends.cudnn.benchmark = True
dev = os.environ.get("DIAG_DEV", "cuda")
cfg = bench.CONFIGS["r50_fpn_gpu" if dev == "cuda" else "cpu_preset"]
ours, _ = bench.build_pair(cfg)
ours = ours.to(dev)
images, _ = bench.synthetic_batch(cfg, device=dev)
fast = optimized_for_inference(ours)
batch, _ = bench._padded_batch(fast, images, cfg.min_size, cfg.max_size)
res = {}

def body():
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev == "cuda"):
        return fast.neck(fast.backbone(batch))

def det():
    return detect(fast, images, cfg.min_size, cfg.max_size)

def fmt(out):
    return {k: (str(v.dtype), v.is_contiguous(memory_format=torch.channels_last), v.is_contiguous()) for k, v in out.items()}

def prof(tag, fn, rows):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            fn()
        bench._sync(dev)
    ka = p.key_averages()
    tot = sum(e.self_device_time_total for e in ka) / 3e3
    res[tag + "_kernel_ms_per_step"] = round(tot, 3)
    print(f"== {tag}: kernel time per step {tot:.2f} ms")
    print(ka.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=70))

for tag in ("eager", "compiled"):
    if tag == "compiled":
        compile_body(fast)
    res[tag + "_body_s"] = bench._median_seconds(body, 10, 3, dev)
    res[tag + "_det_s"] = bench._median_seconds(det, 10, 3, dev)
    res[tag + "_ratio"] = round(res[tag + "_det_s"] / res[tag + "_body_s"], 3)
    res[tag + "_body_format"] = fmt(body())
    out = det()
    if tag == "eager":
        eager_out = out
    else:
        res["compiled_vs_eager_iou0.9"] = bench.agreement(eager_out, out)
        res["detections"] = [len(o["boxes"]) for o in out]
    print(tag, json.dumps({k: v for k, v in res.items() if k.startswith(tag)}), flush=True)
    prof(tag + "_body", body, 12)
    prof(tag + "_det", det, 30)
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "diag.json"), "w"), indent=1)
