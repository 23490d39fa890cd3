"""Variants whose step costs are within the calibration's noise share one plan: the median of theirs."""
import json, statistics, sys
SMALL = {"cjk", "qs_glyphs", "digits", "fashion"}  # images of 32 px or less: the base recipe is s32
FAMILY = ["auto_s32", "auto_s32mem", "auto_s32ms25", "auto_s32lr3", "auto_s32aug"]
for path in sys.argv[1:]:
    d = json.load(open(path))
    plans = d["plans"]
    groups = {}
    for key in plans:
        ds, system, kind = key.split("/")
        if system in FAMILY or (system == "auto" and ds in SMALL):
            groups.setdefault((ds, kind), []).append(key)
    for (ds, kind), keys in groups.items():
        steps = sorted(plans[k]["max_steps"] for k in keys)
        med = statistics.median_low(steps)
        ref = next(k for k in keys if plans[k]["max_steps"] == med)
        for k in keys:
            plans[k]["measured_max_steps"] = plans[k].get("measured_max_steps", plans[k]["max_steps"])
            plans[k]["max_steps"], plans[k]["eval_every"] = plans[ref]["max_steps"], plans[ref]["eval_every"]
            plans[k]["pooled_with"] = keys
        print(ds, kind, steps, "->", med)
    json.dump(d, open(path, "w"), indent=1)
