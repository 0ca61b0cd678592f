"""minilm vs HF transformers on a full-size GPT-2 folder: load time, fp32 logit agreement, greedy
tokens, and the export's agreement back in transformers.

    python bench/hf_gpt2.py [--folder DIR] [--device cuda] [--size 124M|medium|distil]

Without --folder it saves a GPT2LMHeadModel with random weights of the chosen size into a temporary
folder (no network needed); with --folder (e.g. a snapshot of openai-community/gpt2) it uses that.
Prints one markdown table row per check.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from minilm.interop.hf import export  # noqa: E402
from minilm.interop.loading import load_model  # noqa: E402

SIZES = {"124M": dict(n_layer=12, n_head=12, n_embd=768),
         "medium": dict(n_layer=24, n_head=16, n_embd=1024),
         "distil": dict(n_layer=6, n_head=12, n_embd=768)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="124M", choices=SIZES)
    p.add_argument("--tokens", type=int, default=1024, help="sequence length compared")
    p.add_argument("--new_tokens", type=int, default=64, help="greedy tokens compared")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 on both sides
    torch.backends.cudnn.allow_tf32 = False
    tmp = tempfile.TemporaryDirectory()
    folder = Path(args.folder or tmp.name)
    if not args.folder:
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config(**SIZES[args.size])).save_pretrained(folder)
    t = time.perf_counter()
    model, tokenizer, _ = load_model(folder, args.device)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(folder).to(args.device).eval()
    hf_load_s = time.perf_counter() - t
    n = model.param_counts()["total"]
    print(f"| check | value |\n|---|---|\n| model | {folder.name}, {n / 1e6:.1f}M parameters, "
          f"{args.device} |")
    print(f"| load_model / transformers from_pretrained | {load_s:.2f} s / {hf_load_s:.2f} s |")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, args.tokens), generator=g).to(args.device)
    with torch.no_grad():
        delta = (model(ids) - hf(ids).logits).abs().max().item()
    print(f"| max abs logit difference, fp32, 2 x {args.tokens} tokens | {delta:.2e} |")
    prompt = torch.tensor([tokenizer.encode("The meaning of life is")], device=args.device)
    from minilm.sampling.generation import complete

    with torch.no_grad():
        ours = complete(model, prompt.tolist(), args.new_tokens)[0].tokens
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=args.new_tokens, eos_token_id=tokenizer.eot_token,
                             pad_token_id=tokenizer.eot_token)[0, prompt.shape[1]:].tolist()
    same = sum(a == b for a, b in zip(ours, theirs))
    print(f"| greedy tokens equal to HF generate | {same} of {len(theirs)} |")
    with tempfile.TemporaryDirectory() as out:
        t = time.perf_counter()
        export(model.cpu(), tokenizer, Path(out) / "export")
        export_s = time.perf_counter() - t
        back = AutoModelForCausalLM.from_pretrained(Path(out) / "export").to(args.device).eval()
        model.to(args.device)
        with torch.no_grad():
            delta = (model(ids) - back(ids).logits).abs().max().item()
    print(f"| export (incl. tokenizer files) | {export_s:.2f} s |")
    print(f"| max abs logit difference, export in transformers | {delta:.2e} |")


if __name__ == "__main__":
    main()
