"""Super-resolution of held-out images: SR3 (conditional model) vs. bicubic vs. DPS (unconditional prior).

Loads an SR3 checkpoint (``experiment=sr3_digits``) and an unconditional checkpoint of the same data
(``python train.py``), takes the first ``--num-images`` images of the SR3 run's validation split,
measures them with the average-pooling operator of ``task=superres`` (the factor of the SR3 run), and
restores them with ``run_inverse_task`` (exactly what ``sample.py task=superres task_method=...``
runs). Prints mean PSNR / SSIM / NFE / wall time per method, writes them as JSON and a picture with
rows truth / low-res / bicubic / DPS / SR3.

    python benchmarks/sr3_vs_dps.py --sr3 <run>/checkpoints/last.ckpt --prior <run>/checkpoints/last.ckpt \
        --out docs/figures/sr3_digits
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hydra.utils import instantiate  # noqa: E402

from sgm_lightning.evaluation.inverse_tasks import run_inverse_task  # noqa: E402
from sgm_lightning.training.viz import samples_to_image  # noqa: E402
from sgm_lightning.training.lit_module import load_from_sgm_checkpoint  # noqa: E402
from sgm_lightning.training.viz import save_image  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sr3", required=True, help="checkpoint trained with experiment=sr3_digits")
    p.add_argument("--prior", required=True, help="unconditional checkpoint of the same data (for DPS)")
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--show", type=int, default=16, help="images in the picture")
    p.add_argument("--sr3-steps", type=int, default=200)
    p.add_argument("--sr3-sampler", default="ddpm")
    p.add_argument("--dps-steps", type=int, default=500)
    p.add_argument("--zeta", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="sr3_vs_dps")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    sr3 = load_from_sgm_checkpoint(args.sr3)
    prior = load_from_sgm_checkpoint(args.prior)
    data_cfg = sr3.hparams.config["data"]
    factor = int(data_cfg["factor"])
    dm = instantiate(data_cfg)
    dm.setup("fit")
    images = torch.stack([dm.val_dataset[i][0] for i in range(min(args.num_images, len(dm.val_dataset)))])

    runs = {"bicubic": (sr3, {}, 1),
            "dps": (prior, {"zeta": args.zeta}, args.dps_steps),
            "sr3": (sr3, {"sampler": args.sr3_sampler}, args.sr3_steps)}
    results, rows = {}, {}
    for method, (module, opts, steps) in runs.items():
        if method == "sr3":
            opts["interpolation"] = data_cfg.get("interpolation", "bicubic")
        start = time.perf_counter()
        with module.ema_scope(True):
            out = run_inverse_task(module.score_model, module.sde, images, task="superres", method=method,
                                   steps=steps, generator=torch.Generator().manual_seed(args.seed), factor=factor,
                                   **opts)
        wall = time.perf_counter() - start
        results[method] = {"psnr": float(out["psnr"].mean()), "ssim": float(out["ssim"].mean()),
                           "nfe": int(out["nfe"]), "wall_s": round(wall, 1)}
        rows[method] = out["reconstruction"][: args.show]
        rows.setdefault("truth", out["truth"][: args.show])
        rows.setdefault("lowres", out["measurement"][: args.show])
        print(f"{method:>8}: PSNR {results[method]['psnr']:.2f} dB  SSIM {results[method]['ssim']:.3f}  "
              f"NFE {results[method]['nfe']}  {wall:.1f} s")
    summary = {"num_images": len(images), "factor": factor, "split": "val", "seed": args.seed,
               "results": results,
               "settings": vars(args)}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".json", "w") as f:
        json.dump(summary, f, indent=1)
    grid = torch.cat([rows[k] for k in ("truth", "lowres", "bicubic", "dps", "sr3")])
    save_image(samples_to_image(grid, data_range="[-1,1]", nrow=len(rows["truth"])), args.out + ".png")
    print(f"wrote {args.out}.json and {args.out}.png (rows: truth, low-res, bicubic, DPS, SR3)")
    return summary


if __name__ == "__main__":
    main()
