"""Where the top heads of an IOI circuit look from the last position: the IO name, S1, S2, or elsewhere.

    spartan circuit HuggingFaceTB/SmolLM2-135M --task ioi --n-examples 32 --out runs/smollm2-ioi
    python examples/ioi_heads.py HuggingFaceTB/SmolLM2-135M runs/smollm2-ioi/circuit.json

Name-mover heads (Wang et al. 2022) attend to the IO name and copy it; S-inhibition heads attend to S2.
The heads are the circuit's ``top_heads`` (summed |edge score|); attention comes from an eager forward of
the base model (``output_attentions``), on the clean IOI prompts of the circuit's seed.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from spartan_cli.tasks import get_task


def head_targets(model_path: str, circuit_json: str, n: int = 64) -> list[dict]:
    """Mean attention from each prompt's last position to IO, S1, S2 and the rest, for the circuit's top heads."""
    with open(circuit_json) as f:
        circuit = json.load(f)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, attn_implementation="eager").eval()
    task = get_task(circuit["cfg"].get("task") or "ioi")
    batch = task.contrast(tok, n=n, seed=0)
    with torch.no_grad():
        attentions = model(input_ids=batch.clean, attention_mask=batch.attention_mask,
                           output_attentions=True).attentions  # per layer (batch, n_heads, q, k)
    last = batch.attention_mask.sum(1) - 1  # (batch,)
    rows = []
    for head in circuit["summary"]["top_heads"]:
        layer, h = (int(x) for x in head["name"][1:].split(".h"))
        share = torch.zeros(3)
        for i in range(len(last)):
            seen = attentions[layer][i, h, last[i]]  # (k,)
            io = (batch.clean[i] == batch.answers[i, 0]).nonzero().flatten()
            s = (batch.clean[i] == batch.answers[i, 1]).nonzero().flatten()  # S1, S2
            share += torch.stack([seen[io].sum(), seen[s[0]], seen[s[-1]] if len(s) > 1 else seen.new_zeros(())])
        share /= len(last)
        rows.append({"head": head["name"], "score": head["score"], "IO": float(share[0]), "S1": float(share[1]),
                     "S2": float(share[2]), "other": float(1 - share.sum())})
    return rows


if __name__ == "__main__":
    print(f"{'head':8s} {'|score|':>8s} {'IO':>5s} {'S1':>5s} {'S2':>5s} {'other':>6s}")
    for r in head_targets(sys.argv[1], sys.argv[2]):
        print(f"{r['head']:8s} {r['score']:8.2f} {r['IO']:5.2f} {r['S1']:5.2f} {r['S2']:5.2f} {r['other']:6.2f}")
