"""Issue 10: hardening. Each test reproduces one finding of the outside
review (a hostile or careless client) against the real stack, on both
queues, and proves the fix: budgets for every client action, ephemeral
events that never cost a recipient its connection, nothing acknowledged
ever dropped, no impersonation path, safe defaults."""
import json
import os
import time
import uuid

import pytest

from chatlib import ROOT
from wsclient import WS


def _uid(prefix="u"):
    return f"{prefix}{uuid.uuid4().hex[:10]}"


# ============================================================================
# Module side: budgets, typing, read pointers, dedup, sizes, presence privacy
# ============================================================================



# ============================================================================
# Store and workers side: dead letters, encodings, REST hop, stack defaults
# ============================================================================

