"""How close re-tempered T = 1 top-k targets (hf_kd.teachers.cache.retemper, used by T = 1 caches and served
teachers) are to the exact top-k targets at the training temperature, on the packaged SmolLM2-135M teacher.

    python scripts/retemper_error.py [--tokens 256] [--ks 8,32,128] [--temperatures 1.5,2,3]

Per (T, k), over the tokens of held-out tales: the mean |log ratio| of the head mass (sum of the top-k
probabilities; the ratios inside the top-k are exact, only the head/tail split is estimated), the mean absolute
error of the tail mass, and the cosine between the gradients (w.r.t. a student's logits: the half-depth SmolLM2)
of the top-k KL against the exact and the re-tempered targets; the same for the "uniform tail" estimate
(n = V - k tail tokens of equal mass) for comparison.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F


def uniform(lp, log_r, vocab, t):
    """The tail spread evenly over the V - k other tokens, re-tempered (the simpler estimate, for comparison)."""
    head, tail = lp / t, log_r / t + (1 - 1 / t) * math.log(vocab - lp.shape[-1])
    z = torch.logsumexp(torch.cat([head, tail[..., None]], -1), -1)
    return head - z[..., None], tail - z


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--ks", default="8,32,128")
    p.add_argument("--temperatures", default="1.5,2,3")
    a = p.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_kd import make_student
    from hf_kd.tools.assets import load_tales, smollm2_path
    from hf_kd.teachers.cache import retemper, topk_kl, topk_targets
    path = smollm2_path()
    tok, teacher = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    student = make_student(teacher, num_layers=teacher.config.num_hidden_layers // 2)
    ids = tok("\n".join(load_tales("heldout")["text"][:3]), return_tensors="pt").input_ids[:, :a.tokens]
    with torch.inference_mode():
        logits, s_logits = teacher(input_ids=ids).logits[0], student(input_ids=ids).logits[0]
    vocab, rows = logits.shape[-1], []
    for t in (float(x) for x in a.temperatures.split(",")):
        for k in (int(x) for x in a.ks.split(",")):
            top, lp, log_r = topk_targets(logits, k)
            _, x_lp, x_r = topk_targets(logits, k, t)
            row = {"T": t, "k": k, "exact_head_mass": round(float(-torch.expm1(x_r).mean()), 4)}
            estimates = {"midpoint": retemper(lp, log_r, vocab, t), "uniform": uniform(lp, log_r, vocab, t)}
            for name, (r_lp, r_r) in estimates.items():
                grads = []
                for target in ((x_lp, x_r), (r_lp, r_r)):
                    s = s_logits.clone().requires_grad_(True)
                    topk_kl(s, top, *target, temperature=t).backward()
                    grads.append(s.grad.flatten())
                row[name] = {"head_log_ratio": round(float((torch.log(-torch.expm1(r_r))
                                                            - torch.log(-torch.expm1(x_r))).abs().mean()), 4),
                             "tail_abs_error": round(float((r_r.exp() - x_r.exp()).abs().mean()), 4),
                             "grad_cosine": round(float(F.cosine_similarity(*grads, dim=0)), 4)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"tokens": int(ids.shape[1]), "rows": rows}


if __name__ == "__main__":
    main()
