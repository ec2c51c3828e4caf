"""LAQ runs on the day pool (ML45 x 20) that made the JSON files here (paths as on the machine that ran them).

    PYTHONPATH=<repo> python laq_dev.py KIND MOTION_WEIGHT STEPS TAG [KEY=VALUE ...]
    e.g. python laq_dev.py vipra 50 2000 vipra_delta_mw50 model.encode_deltas=True
"""
import json, logging, sys, dataclasses
logging.basicConfig(level=logging.INFO)
logging.getLogger("jaxvla").setLevel(logging.INFO)


def main():
    kind, weight, steps, tag = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    import ast
    extra = {k: ast.literal_eval(v) for k, v in (a.split("=", 1) for a in sys.argv[5:])}
    from jaxvla import compilation_cache
    compilation_cache.enable()
    from jaxvla.experiment import PROTOCOLS, Experiment

    class Dev(Experiment):
        def laq_overrides(self, kind):
            return {**super().laq_overrides(kind), "model.motion_weight": weight, **extra}

    protocol = dataclasses.replace(PROTOCOLS["day"], enforce_laq_gate=False, laq_steps=steps)
    exp = Dev(f"/work/runs/laqdev/{tag}", protocol, data_root="/work/runs/data")
    record = exp.laq(kind)
    g = record["gate"]
    rep = g["report"]
    out = {"tag": tag, "wall": record["wall_seconds"], "passed": g["passed"], "reasons": g["reasons"],
           "usage": rep["usage"], "psnr": rep["psnr"], "psnr_copy": rep["psnr_copy_baseline"],
           "linear": rep["linear"], "knn": rep["knn"]}
    print("RESULT", json.dumps(out, default=str))
    with open(f"/work/runs/laqdev/{tag}.json", "w") as f:
        json.dump(out, f, indent=1, default=str)


if __name__ == "__main__":
    main()
