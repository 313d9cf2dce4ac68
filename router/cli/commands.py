"""The router's subcommands (parsed in :mod:`faasmoe.router.cli.main`)."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager

from faasmoe.proto.errors import ConfigError
from faasmoe.router.control import placement as pl
from faasmoe.router.control.directory import NodeDirectory, parse_address
from faasmoe.router.control.placement_format import format_plan, plan_to_dict

MIB = 1 << 20


@contextmanager
def node_addresses(args):
    """Yield the addresses of the nodes to use (static ``--nodes`` and/or ``--discover``)."""
    static = [parse_address(a) for a in args.nodes.split(",") if a.strip()] if args.nodes else []
    if not static and not args.discover:
        raise ConfigError("no nodes: give --nodes HOST:PORT[,...] or --discover")
    if not args.discover:
        yield static, None
        return
    directory = NodeDirectory(static=static, mdns_interfaces=args.mdns_interface or [])
    directory.start()
    try:
        directory.wait_for(lambda states: False, args.discover_wait_s)   # collect answers for a while
        yield [s.address for s in directory.up_nodes()], directory
    finally:
        directory.stop()


def _session(args):
    from faasmoe.router.control.session import RouterSession
    options = pl.PlacementOptions(replicate=not getattr(args, "no_replicas", False))
    return RouterSession(args.store, tenant_id=getattr(args, "tenant", "default"),
                         step_timeout_s=getattr(args, "step_timeout_s", 30.0), placement_options=options)


def place(args) -> int:
    from faasmoe.router.control.session import node_specs
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
    from transformers import AutoTokenizer

    from faasmoe.router.engine.generate import generate as run
    from faasmoe.router.model.build import build_mesh_model

    session = _session(args)
    try:
        with node_addresses(args) as (addresses, directory):
            if directory is not None:
                session.on_mark_down = directory.mark_down
            t0 = time.perf_counter()
            session.place_and_deploy(addresses)
            warmed = session.warm() if args.warm else 0
            t1 = time.perf_counter()
            model = build_mesh_model(session.store, session.manifest, session.mesh)
            tokenizer = AutoTokenizer.from_pretrained(str(session.store))
            t2 = time.perf_counter()
            results = run(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_p,
                          args.seed)
            t3 = time.perf_counter()
        stats = session.mesh.stats
        if args.json:
            items = [dict(text=r.text, token_ids=r.token_ids, prompt_token_ids=r.prompt_token_ids,
                          step_s=[round(s, 6) for s in r.step_s]) for r in results]
            out = dict(items[0]) if len(items) == 1 else {"results": items}
            out.update(deploy_s=round(t1 - t0, 3), load_model_s=round(t2 - t1, 3), generate_s=round(t3 - t2, 3),
                       rpcs=stats.rpcs, cold_starts=stats.cold_starts, retries=stats.retries, warmed=warmed)
            print(json.dumps(out))
        else:
            for r in results:
                print(r.text)
            print(f"[{sum(len(r.token_ids) for r in results)} tokens in {t3 - t2:.2f} s; "
                  f"{stats.rpcs} RPCs, {stats.cold_starts} cold starts]", file=sys.stderr)
        return 0
    finally:
        session.close()


def status(args) -> int:
    from faasmoe.router.observe.status import collect, render
    mqtt, store = getattr(args, "mqtt", None), getattr(args, "store", None)
    if mqtt and not args.nodes and not args.discover:          # MQTT alone: the nodes that publish there
        report = collect([], store, mqtt_url=mqtt, mqtt_wait_s=args.mqtt_wait_s)
    else:
        with node_addresses(args) as (addresses, directory):
            if directory is not None:      # every node the mesh knows of, down ones too (they show as DOWN)
                addresses = [s.address for s in directory.snapshot()]
            report = collect(addresses, store, mqtt_url=mqtt, mqtt_wait_s=getattr(args, "mqtt_wait_s", 2.0))
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


def serve(args) -> int:
    """Long-running: keep the store placed on the live mesh until SIGINT/SIGTERM."""
    import signal
    import threading

    from faasmoe.router.control.controller import PlacementController

    static = [parse_address(a) for a in args.nodes.split(",") if a.strip()] if args.nodes else []
    if not static and not args.discover:
        raise ConfigError("no nodes: give --nodes HOST:PORT[,...] or --discover")
    session = _session(args)
    directory = NodeDirectory(static=static, mdns_interfaces=(args.mdns_interface or []) if args.discover else None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    from faasmoe.router.observe.metrics import RouterMetrics, start_metrics_server, stop_metrics_server
    from faasmoe.router.observe.telemetry import TelemetryCollector

    telemetry = TelemetryCollector(args.mqtt).start() if args.mqtt else None
    metrics_port = None
    if args.metrics_port is not None:
        metrics = RouterMetrics(lambda: session.mesh.stats, telemetry=telemetry)
        metrics.watch(session.mesh)
        metrics_port = start_metrics_server(metrics.registry, args.metrics_port, host=args.metrics_host)
    directory.start()
    controller = PlacementController(session, directory, settle_s=args.settle_s)
    controller.start()
    print(f"faasmoe-router serving {session.manifest.model_id} ({len(session.manifest.functions)} functions)"
          + (f"; metrics on {args.metrics_host}:{metrics_port}/metrics" if metrics_port is not None else ""),
          flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        controller.stop()
        directory.stop()
        if metrics_port is not None:
            stop_metrics_server(metrics_port)
        if telemetry is not None:
            telemetry.stop()
        session.close()
    return 0
