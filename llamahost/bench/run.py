"""Drive aiperf against one host, level by level, sampling /metrics meanwhile.

Impure (processes, HTTP, SSH), no pyinfra. Writes, under the output directory:
``<host>/c<N>/`` (aiperf's artifacts and log of each level, its configuration without the
key), ``<host>.json`` (the report), ``<host>.md`` (the summary), ``bench.csv`` (every level
of every host of the run) and ``bench.png`` (the plot).
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from llamahost import layout
from llamahost.bench import AIPERF_VERSION, metrics, report
from llamahost.bench import aiperf as ap
from llamahost.bench.workload import Workload
from llamahost.config import HostConfig
from llamahost.gateway.settings import controller_file
from llamahost.layout import REPO
from llamahost.spec import HostSpec

BENCH_VENV = REPO / ".cache" / "bench-venv"
PLOT_SCRIPT = Path(__file__).with_name("plot.py")


class BenchError(Exception):
    pass


@dataclass(frozen=True)
class Target:
    host: str
    url: str
    model: str
    cfg: HostConfig
    key: str = field(repr=False)
    gpu_probe: tuple[str, ...] = ()  # nvidia-smi on the host (GPU hosts), see GpuSampler
    ca_file: str | None = None  # a certificate to trust (a gateway's self-signed one)


def aiperf_path(given: str | None = None) -> Path:
    """--aiperf, else LLAMAHOST_AIPERF, else the bench environment's (make bench-venv)."""
    p = Path(given or os.environ.get("LLAMAHOST_AIPERF") or BENCH_VENV / "bin" / "aiperf")
    if not p.is_file():
        raise BenchError(
            f"aiperf not found at {p}: `make bench-venv` installs aiperf=={AIPERF_VERSION} "
            "into .cache/bench-venv (or pass --aiperf PATH)"
        )
    out = subprocess.run([str(p), "--version"], capture_output=True, text=True, timeout=120)
    if AIPERF_VERSION not in out.stdout + out.stderr:
        raise BenchError(
            f"{p} is not aiperf {AIPERF_VERSION} ({(out.stdout + out.stderr).strip()[:200]!r})"
        )
    return p


def ssh_command(cfg: HostConfig, data: Mapping[str, Any], command: str) -> list[str]:
    """``ssh`` to the host as the inventory says, running ``command`` (with ``sudo -n``
    when the SSH user is not root)."""
    user = str(data.get("ssh_user") or "root")
    argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    if data.get("ssh_port"):
        argv += ["-p", str(data["ssh_port"])]
    if data.get("ssh_key"):
        argv += ["-i", str(data["ssh_key"])]
    if data.get("ssh_known_hosts_file"):
        argv += ["-o", f"UserKnownHostsFile={data['ssh_known_hosts_file']}"]
    if data.get("ssh_strict_host_key_checking"):
        argv += ["-o", f"StrictHostKeyChecking={data['ssh_strict_host_key_checking']}"]
    host = str(data.get("ssh_hostname") or cfg.host_name)
    return [*argv, f"{user}@{host}", command if user == "root" else "sudo -n " + command]


def read_key(cfg: HostConfig, data: Mapping[str, Any], key_file: str | None) -> str:
    """The host's API key: --key-file, else llama_api_key, else the host's key file read
    over SSH (its standard output, never an argument), as the monitoring deploy does."""
    if key_file:
        return Path(key_file).read_text().strip()
    if cfg.api_key:
        return cfg.api_key
    argv = ssh_command(cfg, data, f"cat {cfg.api_key_file}")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    key = p.stdout.strip()
    if p.returncode != 0 or not key:
        raise BenchError(
            f"{cfg.host_name}: cannot read {cfg.api_key_file} over SSH "
            f"(exit {p.returncode}: {p.stderr.strip()[-300:]}); pass --key-file"
        )
    return key


def gateway_ca(gw: HostSpec, data: Mapping[str, Any], out: Path) -> Path:
    """The certificate a client of gateway ``gw`` trusts: the inventory's
    (llama_gateway_tls_cert), else the gateway's self-signed one, read over SSH (the
    certificate only, never its key) into ``out``."""
    if gw.gateway.gateway_tls_cert:
        return controller_file(gw.gateway.gateway_tls_cert)
    argv = ssh_command(gw.cfg, data, f"openssl x509 -in {layout.GATEWAY_PEM}")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if p.returncode != 0 or "BEGIN CERTIFICATE" not in p.stdout:
        raise BenchError(
            f"{gw.name}: cannot read the gateway's certificate over SSH (exit {p.returncode}: "
            f"{p.stderr.strip()[-300:]}); set llama_gateway_tls_cert"
        )
    path = out / "gateway-ca.pem"
    path.write_text(p.stdout)
    return path


class GpuSampler:
    """``probe`` (nvidia-smi on the host, over SSH) running while a level runs; its lines
    summarised when stopped. Nothing to probe: no figures."""

    def __init__(self, probe: tuple[str, ...]) -> None:
        self._proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._reader: threading.Thread | None = None
        if probe:
            self._proc = subprocess.Popen(
                list(probe), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                start_new_session=True,
            )  # fmt: skip
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.append(line)

    def finish(self) -> metrics.GpuStats | None:
        if self._proc is None:
            return None
        _stop_group(self._proc, first=signal.SIGTERM)
        if self._reader is not None:
            self._reader.join(timeout=10)
        return metrics.parse_gpu(self._lines)


class Sampler(threading.Thread):
    """GET /metrics every `interval` seconds until stopped."""

    def __init__(self, url: str, key: str, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self._url = url.rstrip("/") + "/metrics"
        self._headers = {"Authorization": f"Bearer {key}"}
        self._interval = interval
        self._halt = threading.Event()
        self.samples: list[dict[str, float]] = []
        self.failures = 0

    def sample(self) -> None:
        try:
            r = requests.get(self._url, headers=self._headers, timeout=5)
            if r.status_code == 200:
                self.samples.append(metrics.parse(r.text))
                return
        except requests.RequestException:
            pass
        self.failures += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self._interval)

    def finish(self) -> metrics.ServerStats:
        self._halt.set()
        self.join(timeout=10)
        self.sample()  # the counters' last value, after the level
        return metrics.summarise(self.samples)


def _stop_group(proc: subprocess.Popen[Any], first: signal.Signals = signal.SIGINT) -> None:
    """SIGINT to aiperf's session (it writes what it has), then SIGKILL after 20 s."""
    for sig, wait in ((first, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_level(
    target: Target,
    workload: Workload,
    index: int,
    *,
    aiperf: Path,
    tokenizer: str,
    out: Path,
    timeout_s: float,
    sample_server: bool = True,
) -> report.LevelResult:
    level = workload.levels[index]
    d = out / target.host / f"c{level.concurrency}"
    d.mkdir(parents=True, exist_ok=True)
    conf = ap.config(
        level=level,
        model=target.model,
        url=target.url,
        tokenizer=tokenizer,
        seed=workload.seed,
        artifacts=str(d),
    )
    conf_path = d / "aiperf-config.json"
    conf_path.write_text(json.dumps(conf, indent=2) + "\n")
    env = {**os.environ, ap.KEY_ENV: target.key}
    # aiperf's own HF_HUB_OFFLINE refuses a tokenizer directory (docs/bench.md).
    env.pop("HF_HUB_OFFLINE", None)
    if target.ca_file:  # aiperf's HTTP client trusts what OpenSSL's defaults name
        env["SSL_CERT_FILE"] = target.ca_file
    sampler = Sampler(target.url, target.key)
    if sample_server:
        sampler.start()
    gpu = GpuSampler(target.gpu_probe)
    with open(d / "aiperf.log", "w") as log:
        # Its own session: aiperf starts a dozen service processes, and a timeout or a
        # Ctrl-C must stop all of them, not only the first.
        proc = subprocess.Popen(
            [str(aiperf), "profile", "--config", str(conf_path), "--ui", "none"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=d,
            start_new_session=True,
        )
        timed_out = False
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.write(f"\nllamahost: aiperf stopped after {timeout_s:.0f} s\n")
            _stop_group(proc)
            timed_out = True
        except BaseException:
            _stop_group(proc)
            gpu.finish()
            if sample_server:
                sampler.finish()
            raise
    ran = (d / ap.RECORDS).exists() or (d / ap.SUMMARY).exists()
    if proc.returncode != 0 and not timed_out and not ran:
        # aiperf that did not run (a tokenizer it cannot load, a bad option) is a failure
        # of the bench, not a level with no requests. One that ran and counted failed
        # requests (a wrong key) exits non-zero too: its records are the level's figures.
        gpu.finish()
        if sample_server:
            sampler.finish()
        raise BenchError(
            f"aiperf exited {proc.returncode} at concurrency {level.concurrency}: "
            f"{_last_error(d / 'aiperf.log')} (its log: {d / 'aiperf.log'})"
        )
    server = sampler.finish() if sample_server else metrics.summarise([])
    (d / "metrics-samples.json").write_text(json.dumps(sampler.samples) + "\n")
    return report.LevelResult(level, ap.read(d), server, gpu.finish())


def _last_error(log: Path) -> str:
    """The last line of aiperf's log that names an error, else its last line."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or ["no output"])[-1][:300]


def run_host(
    target: Target,
    workload: Workload,
    targets: dict[str, float],
    *,
    aiperf: Path,
    tokenizer: str,
    out: Path,
    run_label: str = "",
    timeout_s: float = 3600.0,
    progress: Any = print,
    sample_server: bool = True,
) -> dict[str, Any]:
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    results = []
    for i in range(len(workload.levels)):
        t0 = time.monotonic()
        r = run_level(target, workload, i, aiperf=aiperf, tokenizer=tokenizer, out=out,
                      timeout_s=timeout_s, sample_server=sample_server)  # fmt: skip
        _said(progress, target, r, time.monotonic() - t0)
        results.append(r)
    return _report(target, workload, targets, results, tokenizer, out, run_label, started)


def _said(progress: Any, target: Target, r: report.LevelResult, seconds: float) -> None:
    c = r.client
    progress(
        f"{target.host}: concurrency {r.level.concurrency}: {c.requests} ok, {c.errors} "
        f"errors, TTFT p95 {c.ttft_p95 or 0:.0f} ms, {c.tps_total or 0:.1f} tok/s "
        f"({seconds:.0f} s)"
    )


def run_instances(
    host: str,
    instances: list[Target],
    workload: Workload,
    targets: dict[str, float],
    *,
    aiperf: Path,
    tokenizer: str,
    out: Path,
    run_label: str = "",
    timeout_s: float = 3600.0,
    progress: Any = print,
) -> list[dict[str, Any]]:
    """A host with several llama-servers (llamahost/instances.py): each level run on every
    instance at once (one aiperf each, at the level's concurrency), so that the instances
    share the host as they do in service. A report per instance (``host:N``), and the
    host's (report.combine: throughput summed, latency the worst instance's)."""
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    results: dict[str, list[report.LevelResult]] = {t.host: [] for t in instances}
    for i in range(len(workload.levels)):
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(len(instances)) as pool:
            futures = {
                t.host: pool.submit(
                    run_level,
                    t,
                    workload,
                    i,
                    aiperf=aiperf,
                    tokenizer=tokenizer,
                    out=out,
                    timeout_s=timeout_s,
                )
                for t in instances
            }
            for t in instances:
                results[t.host].append(futures[t.host].result())
                _said(progress, t, results[t.host][-1], time.monotonic() - t0)
    reps = [
        _report(t, workload, targets, results[t.host], tokenizer, out, run_label, started)
        for t in instances
    ]
    combined = report.combine(host, reps)
    (out / f"{host}.json").write_text(json.dumps(combined, indent=2) + "\n")
    (out / f"{host}.md").write_text(report.summary(combined))
    return [*reps, combined]


def _report(
    target: Target,
    workload: Workload,
    targets: dict[str, float],
    results: list[report.LevelResult],
    tokenizer: str,
    out: Path,
    run_label: str,
    started: str,
) -> dict[str, Any]:
    p = target.cfg.profile
    rep = report.build(
        host=target.host,
        profile={
            "name": p.name,
            "parallel": p.parallel,
            "context": p.context,
            "micro_batch": p.micro_batch,
            "batch": p.batch,
            "flash_attn": p.flash_attn,
            "kv_unified": p.kv_unified,
            "cache_reuse": p.cache_reuse,
            "uses_gpu": p.uses_gpu,
        },
        purpose=workload.purpose,
        seed=workload.seed,
        targets=targets,
        results=results,
        meta={
            "run": run_label,
            "url": target.url,
            "model": target.model,
            "llama_cpp_commit": target.cfg.cpp_commit,
            "aiperf": AIPERF_VERSION,
            "tokenizer": tokenizer,
            "started": started,
        },
    )
    (out / f"{target.host}.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / f"{target.host}.md").write_text(report.summary(rep))
    return rep


def write_run(
    reports: list[dict[str, Any]], out: Path, aiperf: Path, paths: list[Path] | None = None
) -> list[str]:
    """bench.csv and bench.png for the reports of this run (written at `paths`, default
    ``out/<host>.json``); what was written or skipped."""
    (out / "bench.csv").write_text(report.csv_text(reports))
    done = [str(out / "bench.csv")]
    python = aiperf.parent / "python"
    if paths is None:
        paths = [out / f"{r['host']}.json" for r in reports]
    png = out / "bench.png"
    p = subprocess.run(
        [str(python), str(PLOT_SCRIPT), str(png), *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if p.returncode == 0 and png.exists():
        done.append(str(png))
    else:
        done.append(f"no plot ({(p.stdout + p.stderr).strip()[-300:]})")
    return done
