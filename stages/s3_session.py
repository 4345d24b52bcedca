"""The HTTP session s3fs's S3 client uses: aiobotocore's aiohttp session, without `Expect: 100-continue`."""

from __future__ import annotations

from aiobotocore.httpsession import AIOHTTPSession


class NoContinueSession(AIOHTTPSession):
    """aiobotocore's aiohttp session that sends a request's body at once instead of waiting for the store's
    `100 Continue` (botocore asks for one on every PutObject/UploadPart). aiohttp arms no timeout while it
    waits for that answer, so a connection the store stopped answering mid-request held the call forever
    (seen behind a dropped connection that was never reset); sent at once, the read timeout applies and
    botocore retries."""

    async def send(self, request):
        if "Expect" in request.headers:
            del request.headers["Expect"]
        return await super().send(request)
