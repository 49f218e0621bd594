"""The worker's SQS calls that take many entries: ``*_batch`` calls in chunks, their ``Failed``
entries read, logged and retried; and a queue's URL from its ARN (the Lambda event names the
queue a record came from by ARN). Every function takes a boto3 SQS client (or its method)."""

from __future__ import annotations

import time

from worker.observability import logger

SQS_BATCH = 10  # entries per *_batch call (the SQS maximum)
SQS_BATCH_BYTES = 262_144  # the most a send_message_batch call may carry, all bodies together (256 KiB)


def send_entries(call, queue_url: str, entries: list[dict], what: str, attempts: int = 3,
                 backoff: float = 0.2) -> list[dict]:
    """``call`` (an SQS ``*_batch`` method) over ``entries`` in chunks of ten; the entries SQS
    answers as ``Failed`` (or whose call raised after boto3's retries) are logged and retried,
    ``attempts`` tries in all; sender faults (an invalid receipt handle) are not retried.
    Returns the entries that still failed."""
    remaining, final = list(entries), []
    for attempt in range(attempts):
        if attempt and backoff:
            time.sleep(backoff * 2 ** (attempt - 1))
        retry = []
        for start in range(0, len(remaining), SQS_BATCH):
            chunk = remaining[start:start + SQS_BATCH]
            try:
                response = call(QueueUrl=queue_url, Entries=chunk)
            except Exception as error:  # noqa: BLE001 - after boto3's own retries
                logger.warning(f"{what} failed", extra={"entries": len(chunk), "attempt": attempt + 1,
                                                        "reason": f"{type(error).__name__}: {error}"})
                retry += chunk
                continue
            by_id = {entry["Id"]: entry for entry in chunk}
            for failed in response.get("Failed") or []:
                entry = by_id.get(failed.get("Id"))
                if entry is None:
                    continue
                logger.warning(f"{what} failed for a message", extra={
                    "attempt": attempt + 1, "code": failed.get("Code"), "reason": failed.get("Message"),
                    "sender_fault": failed.get("SenderFault")})
                (final if failed.get("SenderFault") else retry).append(entry)
        remaining = retry
        if not remaining:
            return final
    return remaining + final


def queue_url_of_arn(arn: str) -> str:
    """``arn:aws:sqs:<region>:<account>:<name>`` -> ``https://sqs.<region>.<domain>/<account>/<name>``
    (the form SQS accepts as a QueueUrl; boto3 still sends the request to its own endpoint, so
    ``AWS_ENDPOINT_URL`` keeps working)."""
    parts = arn.split(":")
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sqs" or not all(parts[3:]):
        raise ValueError(f"not an SQS queue ARN: {arn!r}")
    _, partition, _, region, account, name = parts
    domain = "amazonaws.com.cn" if partition == "aws-cn" else "amazonaws.com"
    return f"https://sqs.{region}.{domain}/{account}/{name}"


def sqs_record(message: dict, queue_arn: str | None = None) -> dict:
    """A message of a ``receive_message`` response as the SQS record of a Lambda event, so the
    poller feeds the same batch processor as the Lambda handler."""
    return {"messageId": message["MessageId"], "receiptHandle": message["ReceiptHandle"], "body": message["Body"],
            "attributes": message.get("Attributes", {}), "messageAttributes": message.get("MessageAttributes", {}),
            "md5OfBody": message.get("MD5OfBody", ""), "eventSource": "aws:sqs", "eventSourceARN": queue_arn or ""}
