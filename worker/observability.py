"""Structured JSON logs and CloudWatch metrics (Embedded Metric Format) with Powertools for
AWS Lambda: the same lines in Lambda, in the poller container and locally."""

from __future__ import annotations

import os

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit

SERVICE = os.environ.get("POWERTOOLS_SERVICE_NAME", "dogbreeds-worker")
NAMESPACE = os.environ.get("POWERTOOLS_METRICS_NAMESPACE", "dogbreeds")

logger = Logger(service=SERVICE)
metrics = Metrics(namespace=NAMESPACE, service=SERVICE)


def metrics_for_batch(outcome, flush: bool = True) -> None:
    """Images, images/s, item errors and failed messages of one processed batch."""
    ok = sum(o.counts.get("ok", 0) for o in outcome.outcomes)
    errors = sum(o.counts.get("error", 0) for o in outcome.outcomes)
    metrics.add_metric(name="Images", unit=MetricUnit.Count, value=outcome.images)
    metrics.add_metric(name="ImagesOk", unit=MetricUnit.Count, value=ok)
    metrics.add_metric(name="ImageErrors", unit=MetricUnit.Count, value=errors)
    metrics.add_metric(name="FailedMessages", unit=MetricUnit.Count, value=len(outcome.failed_ids))
    if outcome.seconds > 0 and outcome.images:
        metrics.add_metric(name="ImagesPerSecond", unit=MetricUnit.CountPerSecond,
                           value=round(outcome.images / outcome.seconds, 3))
    if flush:
        metrics.flush_metrics()


def metrics_for_stages(**seconds: float | None) -> None:
    """Milliseconds of a batch's stages (``classify_s=...`` -> metric ``ClassifyMilliseconds``);
    a stage given as None is left out. Flushed with the batch's other metrics."""
    for stage, value in seconds.items():
        if value is not None:
            name = stage.removesuffix("_s").capitalize() + "Milliseconds"
            metrics.add_metric(name=name, unit=MetricUnit.Milliseconds, value=round(value * 1000, 1))
