"""`diagnostics dicom ...`: the DICOM network edge on its own."""

from __future__ import annotations

import typer

from diagnostics.cli.common import (
    DEFAULT_SERVE_CONFIG,
    ServeConfigOption,
    SetOption,
    _fail,
    _open_store,
    _serve_config,
)
from diagnostics.cli.dicom_export import outbox, resend

app = typer.Typer(help="The DICOM network edge: receive studies, resend results.")


@app.callback()
def _group() -> None:
    # A group even with one command: `dicom receive`, whether called alone or registered.
    pass


@app.command("receive")
def receive(
    config: ServeConfigOption = DEFAULT_SERVE_CONFIG,
    set_: SetOption = None,
) -> None:
    """Run the DICOM receiver (C-ECHO, C-STORE) alone, until SIGINT or SIGTERM: no HTTP API,
    no worker (run `diagnostics worker` to score what it receives). With destinations
    configured it also sends results back (SR, heatmap captures) from the outbox."""
    import signal
    import threading

    from diagnostics.serve import logs
    from diagnostics.serve.dicom.receiver import DicomReceiver

    cfg = _serve_config(config, set_)
    if not cfg.dicom.callers:
        raise _fail("dicom.callers is empty: map at least one calling AE title to a clinic")
    logs.configure()
    store, data_dir = _open_store(cfg)
    receiver = DicomReceiver(cfg, store)
    try:
        receiver.start()
    except OSError as exc:
        raise _fail(
            f"cannot listen on {cfg.dicom.host}:{cfg.dicom.port}: {exc.strerror or exc}"
        ) from None
    except ValueError as exc:
        raise _fail(str(exc)) from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    typer.echo(f"dicom receiver {cfg.dicom.ae_title} listening on {cfg.dicom.host}:{receiver.port}")
    exporter = None
    if cfg.dicom.export.enabled and cfg.dicom.destinations:
        from diagnostics.serve.dicom.export import Exporter, start_thread

        exporter = Exporter(cfg, store, data_dir)
        exporter_thread, exporter_stop = start_thread(exporter)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        receiver.stop()
        if exporter is not None:
            exporter_stop.set()
            exporter.wake.set()
            exporter_thread.join(timeout=cfg.dicom.export.timeout_s + 5)
        store.close()


app.command("resend")(resend)
app.command("outbox")(outbox)
