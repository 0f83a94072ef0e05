"""`cluster generate`: a small gRPC client of a running `cluster serve` (streams the text as
it comes), or, with --local, an engine in this process."""

from __future__ import annotations

import json
import sys
import time

import grpc

from cluster.api.pdcluster.v1 import pdcluster_pb2 as pb
from cluster.api.pdcluster.v1 import pdcluster_pb2_grpc as pb_grpc
from cluster.router.tls import client_channel

API_KEY_ENV = "PD_CLUSTER_API_KEY"  # the bearer token: the server requires it, clients send it


def sampling_message(params) -> pb.SamplingParams:
    """cluster.engine SamplingParams -> the API's message (every field set explicitly)."""
    msg = pb.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        stop=params.stop,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def generate(
    target: str,
    prompts: list[str],
    params,
    api_key: str | None,
    as_json: bool,
    timeout_s: float,
    tls_ca: str | None = None,
) -> int:
    metadata = [("authorization", f"Bearer {api_key}")] if api_key else []
    with client_channel(target, tls_ca) as channel:
        stub = pb_grpc.PDClusterStub(channel)
        for prompt in prompts:
            request = pb.GenerateRequest(text=prompt, sampling_params=sampling_message(params))
            start = time.perf_counter()
            pieces, tokens, last = [], [], None
            if not as_json:
                print(f"{prompt!r} -> ", end="", flush=True)
            try:
                for response in stub.Generate(request, metadata=metadata, timeout=timeout_s):
                    pieces.append(response.text)
                    tokens += response.token_ids
                    last = response
                    if not as_json:
                        print(response.text, end="", flush=True)
            except grpc.RpcError as e:
                print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
                return 1
            elapsed = time.perf_counter() - start
            timing = last.timing
            if as_json:
                print(
                    json.dumps(
                        {
                            "prompt": prompt,
                            "text": "".join(pieces),
                            "token_ids": tokens,
                            "finish_reason": last.finish_reason,
                            "ttft_s": timing.ttft_s,
                            "transfer_s": timing.transfer_s,
                        }
                    )
                )
            else:
                print(
                    f"  [{len(tokens)} tokens, {last.finish_reason}; TTFT "
                    f"{timing.ttft_s * 1e3:.1f} ms (transfer {timing.transfer_s * 1e3:.1f} ms), "
                    f"{elapsed:.2f} s; prefill {timing.prefill_instance}, decode "
                    f"{timing.decode_instance}]"
                )
    return 0
