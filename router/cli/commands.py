"""The router's subcommands (parsed in :mod:`faasmoe.router.cli.main`)."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager

from faasmoe.proto.errors import ConfigError
from faasmoe.router.control.directory import NodeDirectory, parse_address
from faasmoe.router.control.placement_format import format_plan, plan_to_dict

MIB = 1 << 20


def cluster_tls(args):
    """The router's mutual-TLS credentials from ``--cluster DIR``, or None (plaintext)."""
    if not getattr(args, "cluster", None):
        return None
    from faasmoe.router.control.cluster import Cluster
    return Cluster(args.cluster).router_tls


def static_nodes(args) -> list[str]:
    """The ``--nodes`` addresses; ConfigError when there are none and no ``--discover`` either."""
    static = [parse_address(a) for a in args.nodes.split(",") if a.strip()] if args.nodes else []
    if not static and not args.discover:
        raise ConfigError("no nodes: give --nodes HOST:PORT[,...] or --discover")
    return static


def discovery(args) -> dict:
    """NodeDirectory's discovery arguments from ``--discover [dns-srv:NAME]`` and ``--mdns-interface``."""
    mode = args.discover or ""
    if getattr(args, "dns_srv_interval_s", 5.0) <= 0:
        raise ConfigError("--dns-srv-interval-s must be > 0")
    return {"mdns_interfaces": (args.mdns_interface or []) if mode == "mdns" else None,
            "dns_srv": mode if mode.startswith("dns-srv:") else None,
            "dns_srv_interval_s": getattr(args, "dns_srv_interval_s", 5.0)}


@contextmanager
def node_addresses(args):
    """Yield the addresses of the nodes to use (static ``--nodes`` and/or ``--discover``)."""
    static = static_nodes(args)
    if not args.discover:
        yield static, None
        return
    directory = NodeDirectory(static=static, tls=cluster_tls(args), **discovery(args))
    directory.start()
    try:
        directory.wait_for(lambda states: False, args.discover_wait_s)   # collect answers for a while
        yield [s.address for s in directory.up_nodes()], directory
    finally:
        directory.stop()


def _session(args):
    from faasmoe.router.control.session import RouterSession, default_router_id
    from faasmoe.router.store.manifest import load_manifest
    from faasmoe.router.control.replicas import ReplicaPolicy
    policy = ReplicaPolicy(args.replicas, interval_s=getattr(args, "replica_interval_s", 10.0))
    router_id = getattr(args, "router_id", None)
    if router_id is None and getattr(args, "tenant", None):            # a private router: its own leases
        router_id = f"{default_router_id(load_manifest(args.store))}/{args.tenant}"
    return RouterSession(args.store, router_id=router_id, replica_policy=policy, tls=cluster_tls(args))


def dense_threads(args) -> None:
    """With ``--dense-dtype int8`` this process's ONNX Runtime sessions share one pool of every core and torch
    keeps one thread (:func:`faasmoe.router.model.int8.use_global_pool`; ``--torch-threads`` does not apply)."""
    if getattr(args, "dense_dtype", "float32") == "int8":
        from faasmoe.router.model.int8 import use_global_pool
        use_global_pool()


def engine_config(args):
    if args.reserved_slots < 0:
        raise ConfigError("--reserved-slots must be >= 0")
    from faasmoe.router.engine.engine import EngineConfig
    from faasmoe.router.engine.scheduler import Limits
    try:
        limits = Limits(max_running=args.max_batch, max_step_tokens=args.max_step_tokens,
                        prefill_chunk=args.prefill_chunk,
                        reserved_slots=min(args.reserved_slots, max(0, args.max_batch - 1)))
    except ValueError as exc:
        raise ConfigError(f"{exc}: check --max-batch, --max-step-tokens, --prefill-chunk and --reserved-slots") from None
    if args.max_waiting < 1 or args.step_timeout_s <= 0 or getattr(args, "frame_timeout_s", 1) <= 0:
        raise ConfigError("--max-waiting must be >= 1, --step-timeout-s and --frame-timeout-s > 0")
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            raise ConfigError("--torch-threads must be at least 1")
        import torch
        torch.set_num_threads(args.torch_threads)
    if args.kv_cache_mb <= 0:
        raise ConfigError("--kv-cache-mb must be > 0")
    return EngineConfig(limits=limits, max_waiting=args.max_waiting, step_timeout_s=args.step_timeout_s,
                        kv_cache_bytes=int(args.kv_cache_mb * 2**20), frame_timeout_s=getattr(args, "frame_timeout_s", 10.0),
                        degraded=bool(getattr(args, "degraded", False)))


def place(args) -> int:
    from faasmoe.router.control.survey import node_specs
    session = _session(args)
    try:
        with node_addresses(args) as (addresses, directory):
            views = session.survey(addresses)
            plan = session.plan(views)
            deployed = undeployed = 0
            if not args.dry_run:
                deployed, undeployed = session.apply(plan, views)
        if args.json:
            out = plan_to_dict(plan, session.placement_functions(), node_specs(views))
            out.update(applied=not args.dry_run, deployed=deployed, undeployed=undeployed)
            print(json.dumps(out))
        else:
            print(format_plan(plan, session.placement_functions(), node_specs(views)))
            print("dry run: nothing changed" if args.dry_run
                  else f"deployed {deployed} function copies, undeployed {undeployed}")
        return 0
    finally:
        session.close()


def generate(args) -> int:
    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    import asyncio

    static_nodes(args)                          # the cheap checks first: a bad address or store errs in
    session = _session(args)                    # a moment, before torch and transformers load
    from faasmoe.router.api.openai import degraded_label
    from faasmoe.router.engine.generate import generate as run
    from faasmoe.router.engine.serving import start_serving
    from faasmoe.router.model.precision import dense_dtype

    try:
        config = engine_config(args)
        dense_threads(args)
    except BaseException:
        session.close()
        raise

    async def main():
        with node_addresses(args) as (addresses, directory):
            if directory is not None:
                session.on_mark_down = directory.mark_down
            t0 = time.perf_counter()
            await asyncio.to_thread(session.place_and_deploy, addresses)
            warmed = await asyncio.to_thread(session.warm) if args.warm else 0
            t1 = time.perf_counter()
            serving = await start_serving(session, config, dense_dtype(args.dense_dtype))
            try:
                t2 = time.perf_counter()
                results = await run(serving.engine, serving.tokenizer, args.prompt, args.max_new_tokens,
                                    args.temperature, args.top_p, args.seed)
                t3 = time.perf_counter()
            finally:
                await serving.close()
        return results, serving.mesh.stats, warmed, (t0, t1, t2, t3), serving.precision

    try:
        results, stats, warmed, (t0, t1, t2, t3), precision = asyncio.run(main())
    finally:
        session.close()
    if args.json:
        items = [dict(text=r.text, token_ids=r.token_ids, prompt_token_ids=r.prompt_token_ids,
                      finish_reason=r.finish_reason, step_s=[round(s, 6) for s in r.step_s])
                 | ({"faasmoe_degraded": degraded_label(r.dropped)} if r.dropped else {}) for r in results]
        out = dict(items[0]) if len(items) == 1 else {"results": items}
        out.update(deploy_s=round(t1 - t0, 3), load_model_s=round(t2 - t1, 3), generate_s=round(t3 - t2, 3),
                   rpcs=stats.rpcs, cold_starts=stats.cold_starts, retries=stats.retries, warmed=warmed,
                   faasmoe_precision=precision.label())
        print(json.dumps(out))
    else:
        for r in results:
            print(r.text)
            if r.dropped:
                print(f"warning: degraded, NOT exact: {sum(r.dropped.values())} expert calls were dropped "
                      f"({len(r.dropped)} experts had no answering replica)", file=sys.stderr)
        print(f"[{sum(len(r.token_ids) for r in results)} tokens in {t3 - t2:.2f} s; "
              f"{stats.rpcs} RPCs, {stats.cold_starts} cold starts; precision {precision.header()}"
              f"{'' if precision.exact else ', NOT exact'}]", file=sys.stderr)
    return 0


def status(args) -> int:
    from faasmoe.router.observe.status import collect, render
    mqtt, store = getattr(args, "mqtt", None), getattr(args, "store", None)
    if mqtt and not args.nodes and not args.discover:          # MQTT alone: the nodes that publish there
        report = collect([], store, mqtt_url=mqtt, mqtt_wait_s=args.mqtt_wait_s)
    else:
        with node_addresses(args) as (addresses, directory):
            if directory is not None:      # every node the mesh knows of, down ones too (they show as DOWN)
                addresses = [s.address for s in directory.snapshot()]
            report = collect(addresses, store, mqtt_url=mqtt, mqtt_wait_s=getattr(args, "mqtt_wait_s", 2.0),
                             tls=cluster_tls(args))
    if getattr(args, "plot", None):
        from faasmoe.router.observe.heat import plot_heat
        try:
            plot_heat(report["heat"], args.plot)
        except OSError as exc:
            raise ConfigError(f"cannot write the heat plot to {args.plot}: {exc.strerror}; pick another --plot "
                              "path") from None
        print(f"wrote expert heat plot to {args.plot}", file=sys.stderr)
    print(json.dumps(report) if args.json else render(report, heat=getattr(args, "heat", False)))
    return 0


def serve_full(args) -> int:
    """Long-running: a whole model in this process behind the same API (the benchmarks' baseline)."""
    import asyncio
    import signal

    import torch

    from faasmoe.router.api.full_server import FullModelServer
    from faasmoe.router.api.server import ServeOptions

    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a port number (0 = any free port)")
    if args.tenant and not args.tenants:
        raise ConfigError("--tenant NAME needs --tenants FILE")
    options = ServeOptions(host=args.host, port=args.port, model_name=args.model_name, tenants_file=args.tenants,
                           private_tenant=args.tenant, usage_log=args.usage_log)
    server = FullModelServer(args.model, engine_config(args), options, getattr(torch, args.dense_dtype),
                             announce=lambda line: print(line, flush=True))
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: server.stop())
    asyncio.run(server.run())
    return 0


def serve(args) -> int:
    """Long-running: the OpenAI-compatible API over the mesh, kept placed until SIGINT/SIGTERM."""
    import asyncio
    import signal

    static = static_nodes(args)
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port {args.port} is not a port number (0 = any free port)")
    if args.usage_poll_s <= 0 or args.tenants_poll_s <= 0 or args.replica_interval_s <= 0:
        raise ConfigError("--usage-poll-s, --tenants-poll-s and --replica-interval-s must be > 0")
    from faasmoe.router.store.manifest import load_manifest
    load_manifest(args.store)                   # a missing store errs before torch and transformers load
    from faasmoe.router.api.server import RouterServer, ServeOptions

    config = engine_config(args)
    dense_threads(args)
    session = _session(args)
    directory = NodeDirectory(static=static, tls=session.tls, **discovery(args))
    if args.tenant and not args.tenants:
        raise ConfigError("--tenant NAME (private mode) needs --tenants FILE")
    options = ServeOptions(host=args.host, port=args.port, model_name=args.model_name, warm=args.warm,
                           settle_s=args.settle_s, mqtt_url=args.mqtt, tenants_file=args.tenants,
                           private_tenant=args.tenant, usage_log=args.usage_log, usage_poll_s=args.usage_poll_s,
                           tenants_poll_s=args.tenants_poll_s, cluster_dir=args.cluster,
                           enroll_listen=None if args.enroll_listen == "off" else args.enroll_listen or "default",
                           dense_dtype=args.dense_dtype)
    server = RouterServer(session, directory, config, options, announce=lambda line: print(line, flush=True))
    for sig in (signal.SIGINT, signal.SIGTERM):      # uvicorn shuts down on them, then re-raises them here
        signal.signal(sig, lambda *_: server.stop())
    asyncio.run(server.run())
    return 0
