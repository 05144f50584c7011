"""The original producer loop (confluent-kafka + Faker), for the benchmark.

usage: original_producer.py BROKERS TOPIC COUNT flush|batched
`flush` flushes after every message as the original did; `batched` flushes once at the end.
Prints {"tickets": N, "seconds": S} on the last line.
"""
import json
import random
import sys
import time
from datetime import datetime

from confluent_kafka import Producer
from faker import Faker

brokers, topic, count, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
fake = Faker()
producer = Producer({"bootstrap.servers": brokers})
start_date = datetime(2025, 1, 1)
t0 = time.time()
for i in range(1, count + 1):
    ticket = {
        "ticket_id": f"TICKET-{i:04d}",
        "client_id": random.randint(1000, 9999),
        "created_at": fake.date_time_between(start_date=start_date, end_date="now").isoformat(),
        "request": fake.sentence(nb_words=10),
        "request_type": random.choice(["support", "billing", "technical", "other"]),
        "priority": random.choice(["low", "medium", "high"]),
    }
    producer.produce(topic, key=ticket["ticket_id"], value=json.dumps(ticket))
    if mode == "flush":
        producer.flush()
    else:
        producer.poll(0)
producer.flush()
print(json.dumps({"tickets": count, "seconds": time.time() - t0}))
