"""`fedrdma_mod`: a ClientApp mod that takes the arrays from, and gives them to, the site's node.

Inbound, a message that carries a `descriptor.Offer` has its global fetched by this site's
node into a pool and handed to the app as the ArrayRecord it expects; outbound, the reply's
ArrayRecord is written into that pool and delivered by the node, and only the metrics and a
receipt travel back through Flower. A message without an offer passes untouched, so one
ClientApp serves runs with and without fedrdma.

The site is the SuperNode's: `flower-supernode --node-config 'fedrdma-site="hospital"'`
(and `fedrdma-runtime-dir="..."` when the node does not use the default directory). Anything
that stops the mod (no node, a refused descriptor) becomes the reply's error, with the reason.
"""

from __future__ import annotations

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedrdma.core.errors import FedRDMAError
from fedrdma.flower import records
from fedrdma.flower.descriptor import RECORD, DescriptorError, Offer, Receipt
from fedrdma.flower.timing import NODE_SECONDS
from fedrdma.node.client import NodeClient

SITE_KEY = "fedrdma-site"
RUNTIME_KEY = "fedrdma-runtime-dir"
"""The SuperNode's node-config keys naming this site and its node's runtime directory."""

ROUND_KEY = "server-round"
"""Where Flower's FedAvg family puts the round in the message's config."""


def fedrdma_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    record = msg.content.config_records.get(RECORD) if msg.has_content() else None
    if record is None:
        return call_next(msg, context)
    try:
        return _through_node(msg, context, call_next, Offer.from_record(record))
    except FedRDMAError as exc:
        return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=f"fedrdma: {exc}"), reply_to=msg)


def _through_node(msg: Message, context: Context, call_next: ClientAppCallable, offer: Offer) -> Message:
    layout = offer.checked_layout()
    said = [r.get(ROUND_KEY) for r in msg.content.config_records.values() if ROUND_KEY in r]
    if said and said[0] != offer.round:
        raise DescriptorError(f"the descriptor is for round {offer.round}, the message's config for round {said[0]}")
    site = context.node_config.get(SITE_KEY)
    if not isinstance(site, str) or not site:
        raise DescriptorError(f"this SuperNode names no site: start it with --node-config '{SITE_KEY}=\"NAME\"'")
    runtime = context.node_config.get(RUNTIME_KEY) or None
    with NodeClient.attach(site, str(runtime) if runtime else None) as node:
        name = f"flower-{layout.layout_id}"
        pool = node.pool(name, layout)
        release = node.pools[name].release  # the pool's pages are not carried through training
        moved = node.fetch(name, offer.fetch).seconds
        del msg.content[RECORD]
        msg.content[offer.arrays_key] = records.read(pool, release)
        reply = call_next(msg, context)
        if offer.deliver is None or reply.has_error():
            return reply
        arrays = list(reply.content.array_records.items())
        if len(arrays) != 1:
            raise DescriptorError(f"the ClientApp replied with {len(arrays)} ArrayRecords; fedrdma moves exactly one")
        records.write(arrays[0][1], pool, release)
        moved += node.deliver(name, offer.deliver).seconds
        del reply.content[arrays[0][0]]
        for metrics in reply.content.metric_records.values():
            metrics[NODE_SECONDS] = moved
        reply.content[RECORD] = Receipt(site=site, seq=offer.deliver.round).to_record()
        return reply
