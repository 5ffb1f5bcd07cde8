"""`fedrdma certs init|issue`: a federation's CA, the aggregator's certificate, one per silo."""

from __future__ import annotations

from pathlib import Path

import typer

from fedrdma.cli.console import console
from fedrdma.control.certs import CA_DAYS, CERT_DAYS, DEFAULT_HOSTS, init_ca, issue
from fedrdma.transport.tls import CLIENT, SERVER, CredentialError

app = typer.Typer(help="A federation's certificates: one CA, the aggregator's, one per silo.", no_args_is_help=True)


def _fail(exc: CredentialError) -> None:
    console(stderr=True).print(f"[bold red]certs:[/] {exc}")
    raise typer.Exit(1)


@app.command("init")
def init(
    directory: Path = typer.Argument(..., metavar="DIR", help="Where ca.pem and ca.key go (keep ca.key here)."),
    days: int = typer.Option(CA_DAYS, min=1, help="How long the CA is valid."),
    force: bool = typer.Option(False, "--force", help="Replace an existing CA (every certificate must be re-issued)."),
) -> None:
    """Create the federation's CA. Give sites ca.pem, never ca.key."""
    try:
        path = init_ca(directory, days=days, force=force)
    except CredentialError as exc:
        _fail(exc)
    console().print(f"CA: {path} (its key {directory / 'ca.key'} stays here)")


@app.command("issue")
def issue_command(
    directory: Path = typer.Argument(..., metavar="DIR", help="The CA's directory; NAME.pem and NAME.key go here."),
    name: str = typer.Argument(..., metavar="NAME", help="The aggregator's name, or the silo's id."),
    role: str = typer.Option(..., help=f"{SERVER} (a TLS server, named by the hosts silos dial) or {CLIENT}."),
    host: list[str] = typer.Option([], "--host", help=f"Aggregator only: a DNS name or IP address silos dial; "
                                   f"repeatable (default: {', '.join(DEFAULT_HOSTS)})."),
    days: int = typer.Option(CERT_DAYS, min=1, help="How long the certificate is valid."),
    force: bool = typer.Option(False, "--force", help="Replace an existing certificate and key (rotation)."),
) -> None:
    """Issue a certificate from the CA in DIR; copy NAME.pem, NAME.key and ca.pem to the site."""
    if role not in (SERVER, CLIENT):
        raise typer.BadParameter(f"--role takes {SERVER} or {CLIENT}, not {role!r}", param_hint="--role")
    try:
        cert, key = issue(directory, name, role, hosts=host, days=days, force=force)
    except CredentialError as exc:
        _fail(exc)
    console().print(f"{role} certificate: {cert}, key {key} (owner-only); the site also needs {directory / 'ca.pem'}")
