"""`python -m fedrdma.cli ...`: the `fedrdma` command, as the demo and the tests start it."""

from fedrdma.cli import app

app(prog_name="fedrdma")
