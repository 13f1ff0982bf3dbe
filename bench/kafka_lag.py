#!/usr/bin/env python3
"""Prints how many records of topic chat.in the consumer group (default
chat-persist) has not committed yet: the sum over partitions of the high
watermark minus the committed offset (scripts/bench, persistence lag)."""
import sys

from confluent_kafka import Consumer, TopicPartition

brokers = sys.argv[1]
group = sys.argv[2] if len(sys.argv) > 2 else "chat-persist"
c = Consumer({"bootstrap.servers": brokers, "group.id": group, "enable.auto.commit": False})
meta = c.list_topics("chat.in", timeout=10).topics["chat.in"]
tps = [TopicPartition("chat.in", p) for p in meta.partitions]
lag = 0
for tp in c.committed(tps, timeout=10):
    low, high = c.get_watermark_offsets(tp, timeout=10)
    lag += high - (tp.offset if tp.offset >= 0 else low)
c.close()
print(lag)
