"""One dynamic partition per SAE, keyed ``"{release}:{sae_id}"`` (``core.registry.SaeRef.key``).

A single dynamic dimension rather than release × layer × width multi-partitions: a new layer or L0 on
the hub is one new key, and it avoids Dagster's failure to load multi-partitions with a dynamic
dimension outside a run ("instance is not available to load partitions").
"""

import dagster as dg

sae_partitions = dg.DynamicPartitionsDefinition(name="sae")
