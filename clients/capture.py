"""A Flower client mod that records what every reply of this node contains (field names and kinds, never
values) to a local JSON-lines file: the evidence the release-inventory test checks against
``federation/inventory.py``. Writing it changes nothing that leaves the node."""
from __future__ import annotations

import json
import os
from typing import Callable

from flwr.app import Context, Message

from federation.inventory import fields_of


def capture_mod(path: str) -> Callable[[Message, Context, Callable[[Message, Context], Message]], Message]:
    def mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
        reply = call_next(msg, context)
        record = {"message": msg.metadata.message_type, "node": int(context.node_id),
                  "fields": ["error:reason"] if reply.has_error() else fields_of(msg.metadata.message_type, reply.content)}
        line = json.dumps(record) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())  # one write per line: atomic append across Ray worker processes
        finally:
            os.close(fd)
        return reply

    return mod
