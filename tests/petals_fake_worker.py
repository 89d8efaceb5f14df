"""A stand-in for the Petals client worker (distattr/models/petals_worker.py), for fast tests without a swarm.

It speaks the same pipe protocol but runs the decoder blocks of a local model folder in this process
(transformers 5, distattr's environment): ``python petals_fake_worker.py FOLDER [--hang-after N] [--missing]``.
``--hang-after N`` stops answering after N requests (a swarm that does not answer); ``--missing`` answers
``open`` as a swarm that lacks blocks.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

# the real worker's message framing, loaded by path (importing the distattr package would load transformers)
_spec = importlib.util.spec_from_file_location(
    "petals_worker", Path(__file__).resolve().parents[1] / "distattr" / "models" / "petals_worker.py")
_worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_worker)
read_message, write_message = _worker.read_message, _worker.write_message


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--hang-after", type=int, default=None)
    parser.add_argument("--missing", action="store_true")
    args = parser.parse_args()
    channel_in, channel_out = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    torch.set_num_threads(1)
    decoder = None if args.missing else load_blocks(args.folder)  # like the real worker's imports: before "ready"
    write_message(channel_out, {"ok": True, "ready": True})
    graphs: dict[int, tuple] = {}
    served = 0
    while True:
        request = read_message(channel_in)
        if request is None or request["op"] == "close":
            return
        served += 1
        if args.hang_after is not None and served > args.hang_after:
            time.sleep(3600)
        for handle in request.get("release", ()):
            graphs.pop(handle, None)
        if request["op"] == "open":
            n = request["config"]["num_hidden_layers"]
            if args.missing:
                reply = {"ok": False, "kind": "MissingBlocksError", "error": "No servers holding blocks 0 are online."}
            else:
                reply = {"ok": True, "spans": [(0, n, "fake-peer")], "n_blocks": n}
        elif request["op"] == "forward":
            leaf = request["hidden"].detach().requires_grad_(bool(request["grad"]))
            with torch.set_grad_enabled(bool(request["grad"])):
                output = decoder(inputs_embeds=leaf, use_cache=False).last_hidden_state
            handle = None
            if request["grad"]:
                handle = len(graphs) + served * 1000
                graphs[handle] = (leaf, output)
            reply = {"ok": True, "output": output.detach(), "handle": handle}
        else:
            leaf, output = graphs[request["handle"]]
            (grad,) = torch.autograd.grad(output, leaf, request["grad_output"], retain_graph=True)
            reply = {"ok": True, "grad_input": grad, "live_graphs": len(graphs)}
        write_message(channel_out, reply)


def load_blocks(folder: str) -> nn.Module:
    """The model's decoder without its final norm (the client applies that itself): embeddings in, blocks run."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    model.requires_grad_(False)
    decoder = model.get_decoder()
    decoder.norm = nn.Identity()
    return decoder


if __name__ == "__main__":
    sys.exit(main())
