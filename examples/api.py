"""The spartan commands from Python: post-train, measure, export, load the export with plain transformers.

    python examples/api.py                      # the built-in addition model, 300 steps (a few minutes on CPU)
"""
import torch
from transformers import AutoModelForCausalLM

import spartan_cli


def main(model="addition", out="runs/api-example", steps=300, data=None, device="cpu"):
    run = spartan_cli.sparsify(model, out=out, data=data, overwrite=True, train={"steps": steps, "device": device})
    print(f"density {run.summary['density']:.2%} at CE {run.summary['ce']:.4f} (target {run.summary['target_loss']:.4f})")
    dens = spartan_cli.density(out, device=device)  # per layer/head, keys read per query
    print(f"heads shut: {dens.result.to_dict()['overall']['heads_shut']}")
    spartan_cli.export(out, format="hf", out=f"{out}-hf", overwrite=True)  # gates active, no remote code
    sparse, tok = spartan_cli.load(out)
    plain = AutoModelForCausalLM.from_pretrained(f"{out}-hf")  # works because spartan_cli is imported
    ids = tok("53+21=00074", return_tensors="pt").input_ids
    with torch.no_grad():
        print("max |logit diff|:", float((plain(ids).logits - sparse(ids).logits).abs().max()))
    return run, dens


if __name__ == "__main__":
    main()
