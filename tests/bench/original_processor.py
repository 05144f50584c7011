"""The original PySpark processor's logic, for the benchmark (not part of the pipeline).

Reads a JSON Lines file with the original schema, adds support_team with the original
when/otherwise mapping, counts by request_type, writes both as JSON (local[2]).
Prints timings as JSON on the last line: total wall time, and Spark start-up alone.
"""
import json
import sys
import time

t0 = time.time()
from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql.functions import col, when  # noqa: E402
from pyspark.sql.types import IntegerType, StringType, StructField, StructType  # noqa: E402

src, out = sys.argv[1], sys.argv[2]
spark = (
    SparkSession.builder.master("local[2]")
    .appName("original-ticket-processor")
    .config("spark.ui.enabled", "false")
    .config("spark.sql.shuffle.partitions", "2")
    .getOrCreate()
)
spark.sparkContext.setLogLevel("ERROR")
t_started = time.time()

schema = StructType(
    [
        StructField("ticket_id", StringType()),
        StructField("client_id", IntegerType()),
        StructField("created_at", StringType()),
        StructField("request", StringType()),
        StructField("request_type", StringType()),
        StructField("priority", StringType()),
    ]
)
df = spark.read.schema(schema).json(src)
enriched = df.withColumn(
    "support_team",
    when(col("request_type") == "technical", "Tech Support")
    .when(col("request_type") == "billing", "Billing Team")
    .when(col("request_type") == "support", "Customer Service")
    .otherwise("General Support"),
)
enriched.write.mode("overwrite").json(f"{out}/enriched_tickets")
enriched.groupBy("request_type").count().write.mode("overwrite").json(f"{out}/ticket_counts_by_type")
t_end = time.time()
spark.stop()
print(json.dumps({"wall_s": t_end - t0, "startup_s": t_started - t0}))
