"""The official `openai` Python client over HTTPS against `roe serve --tls-cert/--tls-key`,
given the CA as its documentation says (an `ssl` context with the CA in
`DefaultHttpxClient(verify=...)`). Run by cli/tests/http_api.rs, which starts the server with
`roe tls self-signed`'s pair and names the root, the CA and an API key in $ROE_HTTPS_ROOT,
$ROE_HTTPS_CA and $ROE_HTTPS_KEY. The last line printed is a JSON summary the Rust test reads.
"""

import json
import os
import ssl

import openai

root = os.environ["ROE_HTTPS_ROOT"]
ca = os.environ["ROE_HTTPS_CA"]
key = os.environ["ROE_HTTPS_KEY"]


def client(api_key, trust_ca=True):
    http_client = None
    if trust_ca:
        http_client = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=ca))
    return openai.OpenAI(base_url=root + "/v1", api_key=api_key, max_retries=0,
                         http_client=http_client)


summary = {"models": sorted(m.id for m in client(key).models.list())}
try:
    client("not-the-key-" + "x" * 16).models.list()
    summary["wrong_key"] = "accepted"
except openai.AuthenticationError as e:
    summary["wrong_key"] = e.status_code
# Without the CA the client's own trust store does not know the certificate.
try:
    client(key, trust_ca=False).models.list()
    summary["without_ca"] = "accepted"
except openai.APIConnectionError:
    summary["without_ca"] = "refused"
print(json.dumps(summary))
