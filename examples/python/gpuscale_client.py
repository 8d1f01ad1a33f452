#!/usr/bin/env python3
"""A gpuscale client in Python: proof that other languages speak the API.

The gRPC code is generated from the repository's proto/ files with
grpcio-tools when the script starts (into a temporary directory; nothing
generated is committed). Two parts, each optional:

  * the scaler's ScalerService (--scaler HOST:PORT): list the workloads,
    then watch recommendations until each condition given holds;
  * an agent's node-local ServingService (--serving HOST:PORT), as an
    inference engine would use it: declare the engine warm, push its
    statistics (cumulative counters, latency histograms) every interval, and
    watch the batch limit and drain flag the scaler sets for its pod.

Run against a live scaler and agent:

    pip install 'grpcio-tools>=1.60,<2'
    python3 examples/python/gpuscale_client.py \\
        --scaler 127.0.0.1:7070 --serving 127.0.0.1:7071 \\
        --pod default/chat-0 --model llama-3-8b --selector app=chat

Every line it prints starts with a word saying what it is (workload,
readiness, recommendation, limits, done), so scripts and tests can read it.
Exit status: 0 when the wait conditions held, 1 on timeout, 2 on bad usage.
"""

import argparse
import pathlib
import sys
import tempfile
import threading
import time

try:
    import grpc
    from grpc_tools import protoc
except ImportError as e:  # pragma: no cover - depends on the machine
    sys.stderr.write(
        f"gpuscale_client.py: {e}. Install the generator and runtime: "
        "python3 -m pip install 'grpcio-tools>=1.60,<2'\n"
    )
    sys.exit(2)

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTO_DIR = REPO / "proto"

# Threads print concurrently; print() writes the text and the newline
# separately, so two lines can interleave. One write per line, under a lock.
_OUT_LOCK = threading.Lock()


def emit(line):
    with _OUT_LOCK:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# TTFT bucket bounds (seconds) of the pushed histogram; the last is +Inf.
TTFT_BOUNDS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, float("inf")]


def generate(out_dir):
    """Compile proto/gpuscale/v1/*.proto into out_dir and import the modules."""
    protos = sorted(str(p) for p in (PROTO_DIR / "gpuscale" / "v1").glob("*.proto"))
    if not protos:
        sys.stderr.write(f"gpuscale_client.py: no .proto files under {PROTO_DIR}\n")
        sys.exit(2)
    include = str(pathlib.Path(protoc.__file__).parent / "_proto")
    code = protoc.main([
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ])
    if code != 0:
        sys.stderr.write(f"gpuscale_client.py: protoc failed with status {code}\n")
        sys.exit(2)
    sys.path.insert(0, str(out_dir))
    from gpuscale.v1 import common_pb2, scaler_pb2, scaler_pb2_grpc  # noqa: E402
    from gpuscale.v1 import serving_pb2, serving_pb2_grpc  # noqa: E402
    return common_pb2, scaler_pb2, scaler_pb2_grpc, serving_pb2, serving_pb2_grpc


def pod_ref(common_pb2, text):
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name:
        sys.stderr.write(f"gpuscale_client.py: --pod `{text}`: expected namespace/name\n")
        sys.exit(2)
    return common_pb2.PodRef(namespace=namespace, name=name)


def show_recommendation(kind, r, scaler_pb2):
    w = r.workload
    emit(
        f"{kind} {w.namespace}/{w.name} desired={r.desired_replicas} "
        f"current={r.current_replicas} ready={r.ready_replicas} "
        f"in_flight={r.in_flight_replicas} "
        f"batch_limit={r.batch_limit if r.HasField('batch_limit') else 'none'} "
        f"slo={scaler_pb2.SloStatus.Name(r.slo_status)} action={r.action or 'none'} "
        f"removed={str(r.removed).lower()} reason={r.reason!r}"
    )


class EnginePusher:
    """Pushes one engine's statistics as a continuously batching engine
    would: counters grow with the offered load, TTFT is a histogram."""

    def __init__(self, serving_pb2, common_pb2, pod, model, rps, interval):
        self.serving_pb2 = serving_pb2
        self.common_pb2 = common_pb2
        self.pod = pod
        self.model = model
        self.rps = rps
        self.interval = interval
        self.stop = threading.Event()
        self.sent = 0

    def messages(self):
        arrived = 0.0
        prompt = generated = 0.0
        ttft_counts = [0] * len(TTFT_BOUNDS)
        ttft_sum = 0.0
        while not self.stop.is_set():
            n = self.rps * self.interval
            arrived += n
            prompt += n * 512
            generated += n * 128
            # Every request's first token after about 0.12 s.
            for i, bound in enumerate(TTFT_BOUNDS):
                if bound >= 0.15:
                    ttft_counts[i] += int(n)
            ttft_sum += int(n) * 0.12
            count = ttft_counts[-1]
            yield self.serving_pb2.EngineStats(
                pod=self.pod,
                model=self.model,
                requests_waiting=0.0,
                requests_running=min(8.0, self.rps),
                kv_cache_usage_ratio=0.25,
                prompt_tokens_total=prompt,
                generation_tokens_total=generated,
                requests_arrived_total=arrived,
                requests_finished_total=arrived,
                ttft_seconds=self.common_pb2.Histogram(
                    upper_bounds=TTFT_BOUNDS,
                    cumulative_counts=ttft_counts,
                    sum=ttft_sum,
                    count=count,
                ),
            )
            self.sent += 1
            self.stop.wait(self.interval)

    def run(self, stub):
        try:
            reply = stub.ReportEngineStats(self.messages())
            emit(f"pushed accepted={reply.accepted}")
        except grpc.RpcError as e:
            if not self.stop.is_set():
                emit(f"error ReportEngineStats {e.code().name}: {e.details()}")


class LimitsWatcher:
    """Follows WatchLimits for one pod: the current limits, then changes."""

    def __init__(self, stub, serving_pb2, pod):
        self.call = stub.WatchLimits(serving_pb2.WatchLimitsRequest(pod=pod))
        self.seen = []
        self.stopping = False

    def run(self):
        try:
            for limits in self.call:
                limit = limits.batch_limit if limits.HasField("batch_limit") else None
                emit(
                    f"limits {limits.pod.namespace}/{limits.pod.name} "
                    f"batch_limit={limit if limit is not None else 'none'} "
                    f"draining={str(limits.draining).lower()}"
                )
                self.seen.append(limit)
        except grpc.RpcError as e:
            if not self.stopping:
                emit(f"error WatchLimits {e.code().name}: {e.details()}")

    def stop(self):
        self.stopping = True
        self.call.cancel()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scaler", help="the scaler's gRPC address, HOST:PORT")
    parser.add_argument("--serving", help="an agent's ServingService address, HOST:PORT")
    parser.add_argument("--pod", help="the engine's pod, namespace/name (with --serving)")
    parser.add_argument("--model", default="llama-3-8b", help="the model the engine serves")
    parser.add_argument("--rps", type=float, default=20.0, help="requests per second to report")
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between pushes")
    parser.add_argument("--selector", default="", help="label selector for the watch")
    parser.add_argument("--namespace", default="", help="only workloads in this namespace")
    parser.add_argument("--until-ready", type=int, default=None,
                        help="watch until a recommendation reports at least this many ready replicas")
    parser.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    args = parser.parse_args()
    if not args.scaler and not args.serving:
        parser.error("give --scaler, --serving or both")
    if args.serving and not args.pod:
        parser.error("--serving needs --pod namespace/name")

    with tempfile.TemporaryDirectory(prefix="gpuscale-py-") as out:
        common_pb2, scaler_pb2, scaler_pb2_grpc, serving_pb2, serving_pb2_grpc = generate(out)
        deadline = time.monotonic() + args.timeout
        ok = True
        threads = []
        pusher = None
        limits = None

        if args.serving:
            channel = grpc.insecure_channel(args.serving)
            serving = serving_pb2_grpc.ServingServiceStub(channel)
            pod = pod_ref(common_pb2, args.pod)
            serving.SetReadiness(
                serving_pb2.SetReadinessRequest(
                    pod=pod,
                    readiness=serving_pb2.SetReadinessRequest.READINESS_WARM,
                    message="weights loaded, warm-up done",
                ),
                timeout=10,
            )
            emit(f"readiness {args.pod} warm")
            pusher = EnginePusher(serving_pb2, common_pb2, pod, args.model, args.rps, args.interval)
            limits = LimitsWatcher(serving, serving_pb2, pod)
            for target in (lambda: pusher.run(serving), limits.run):
                t = threading.Thread(target=target, daemon=True)
                t.start()
                threads.append(t)

        if args.scaler:
            channel = grpc.insecure_channel(args.scaler)
            scaler = scaler_pb2_grpc.ScalerServiceStub(channel)
            listed = scaler.ListWorkloads(
                scaler_pb2.ListWorkloadsRequest(namespace=args.namespace, selector=args.selector),
                timeout=10,
            )
            for w in listed.workloads:
                labels = ",".join(f"{k}={v}" for k, v in sorted(w.labels.items()))
                emit(f"workload {w.workload.namespace}/{w.workload.name} labels={labels}")
            if args.until_ready is not None:
                ok = False
                remaining = max(1.0, deadline - time.monotonic())
                stream = scaler.WatchRecommendations(
                    scaler_pb2.WatchRecommendationsRequest(
                        selector=args.selector, namespace=args.namespace),
                    timeout=remaining,
                )
                wanted_limit = None
                try:
                    for r in stream:
                        show_recommendation("recommendation", r, scaler_pb2)
                        if (not r.removed and r.decided_at_unix_ms > 0
                                and r.ready_replicas >= args.until_ready
                                and r.HasField("batch_limit")):
                            wanted_limit = r.batch_limit
                            break
                except grpc.RpcError as e:
                    emit(f"error WatchRecommendations {e.code().name}: {e.details()}")
                finally:
                    stream.cancel()
                # The engine must also have received the scaler's batch limit.
                while wanted_limit is not None and time.monotonic() < deadline:
                    if limits is None or wanted_limit in limits.seen:
                        ok = True
                        break
                    time.sleep(0.05)

        if args.serving and not args.scaler:
            # Without a scaler to watch, push for the whole timeout.
            time.sleep(max(0.0, deadline - time.monotonic()))
        if pusher is not None:
            pusher.stop.set()
        if limits is not None:
            limits.stop()
        for t in threads:
            t.join(timeout=5)
        emit(f"done ok={str(ok).lower()}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
