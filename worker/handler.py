"""AWS Lambda entry point: SQS event source with partial batch failures.

Powertools' batch processor (:func:`worker.jobs.write_manifests`, shared with the poller) runs
the record handler -- write that message's manifest -- over the event's records and reports
exactly the failed message ids in ``batchItemFailures`` (the function's event source mapping
needs ``ReportBatchItemFailures``). All records of the event are classified together first (so
one-photo S3 event messages still infer in full batches). A batch whose every message failed
(e.g. a deadline reached before any was finished) is reported like any other, all ids in
``batchItemFailures``, not raised as a function error. The model is loaded
once per execution environment and reused across invocations.

Time limit: the invocation's deadline is ``context.get_remaining_time_in_millis()`` less
``DOGBREEDS_LAMBDA_SAFETY_MS`` (:mod:`worker.deadline`): past it no new work starts, the
messages already answered get their manifests and the others are reported in
``batchItemFailures`` (retried), so the function never times out half-way through a batch.
A prefix job longer than a page sends its continuation pages to the queue its record came from
(the record's ``eventSourceARN``; the role needs ``sqs:SendMessage`` on it)."""

from __future__ import annotations

from worker.classifier import Classifier
from worker.continuations import ContinuationSender
from worker.deadline import Deadline
from worker.jobs import OutputSettings, QueuedMessage, process_messages
from worker.observability import logger, metrics, metrics_for_batch
from worker.pipeline import Pipeline, PipelineSettings
from worker.settings import WorkerSettings, client
from worker.sqs import queue_url_of_arn

_pipeline: Pipeline | None = None  # the cached model: one per execution environment
_sqs = None  # the SQS client for continuation pages: one per execution environment


def get_pipeline(env: WorkerSettings) -> Pipeline:
    global _pipeline
    if _pipeline is None:
        if not env.model:
            raise RuntimeError("DOGBREEDS_MODEL is not set: which model artifact should the worker serve?")
        s3 = client("s3")
        classifier = Classifier.load(env.model, top_k=env.top_k, s3=s3, runtime=env.runtime, dog_check=env.dog_check,
                                     min_score=env.min_score)
        _pipeline = Pipeline(classifier, s3, PipelineSettings(batch_size=env.batch_size,
                                                              download_threads=env.download_threads,
                                                              top_k=env.top_k,
                                                              decode_budget_pixels=env.decode_budget_pixels))
        logger.info("model loaded", extra={"model": classifier.model_info})
    return _pipeline


def get_sqs():
    """The SQS client that sends continuation pages (one per execution environment)."""
    global _sqs
    if _sqs is None:
        _sqs = client("sqs")
    return _sqs


@metrics.log_metrics
@logger.inject_lambda_context
def lambda_handler(event: dict, context) -> dict:
    env = WorkerSettings.from_env()  # read per invocation: a bad DOGBREEDS_* value is a SettingsError naming it
    pipeline = get_pipeline(env)
    deadline = Deadline.of_lambda(context, env.lambda_safety_ms)  # after the cold start: its time is spent
    records = event.get("Records", [])
    queues = {r["messageId"]: r.get("eventSourceARN") for r in records}
    continuations = ContinuationSender(get_sqs, lambda message_id: queues.get(message_id)
                                       and queue_url_of_arn(queues[message_id]))
    outcome = process_messages([QueuedMessage(r["messageId"], r["body"]) for r in records], pipeline,
                               OutputSettings(env.output_bucket, env.output_prefix, env.jsonl,
                                              max_prefix_keys=env.max_prefix_keys, page_keys=env.prefix_page_keys),
                               deadline, continuations, records)
    metrics_for_batch(outcome, flush=False)
    return outcome.response
