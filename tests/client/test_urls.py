"""One convention for where a job lives, for `Client` and `fit` alike: the server's root
URL and the job's name, or the job's URL as the status route has it (issue 25)."""

from __future__ import annotations

from typing import Any

import pytest

import fedclient
from fedclient.protocol import split_job_url
from tests.conftest import LiveServer


@pytest.mark.parametrize(
    ("url", "job"),
    [("{root}/v1/jobs/digits", ""), ("{root}/jobs/digits/", "digits"), ("{root}/", "digits")],
)
def test_a_client_takes_the_root_and_a_name_or_the_jobs_url(
    live_server: Any, digits: Any, url: str, job: str
) -> None:
    live: LiveServer = live_server(devices_per_round=1)
    device = fedclient.Client(
        url.format(root=live.url), job, (digits.x_train[:60], digits.y_train[:60])
    )
    assert (device.server, device.job) == (live.url, "digits")
    assert device.run_once().status == "uploaded"
    device.close()


@pytest.mark.parametrize(
    ("server", "job", "message"),
    [
        ("fl.example.com", "digits", "expected the server's URL"),
        ("http://host/v1/jobs/digits", "keyboard", "names job 'digits'"),
        ("http://host", "", "which job"),
        ("http://host/jobs/", "", "ends in /jobs/NAME"),
    ],
)
def test_a_url_it_cannot_use_is_refused_saying_what_it_expects(
    server: str, job: str, message: str, digits: Any
) -> None:
    with pytest.raises(fedclient.InvalidInput, match=message):
        fedclient.Client(server, job, (digits.x_train[:5], digits.y_train[:5]))


def test_a_wrong_path_is_a_not_found_that_says_what_the_url_should_be(
    live_server: Any, digits: Any
) -> None:
    live: LiveServer = live_server()
    device = fedclient.Client(f"{live.url}/api", "digits", (digits.x_train[:5], digits.y_train[:5]))
    with pytest.raises(fedclient.NotFound, match=r"server's root URL \(https://host\[:port\]\)"):
        device.run_once()
    result = device.run_forever()
    assert result.reason == "job_not_found" and "/api/v1/jobs/digits/checkin" in str(result.error)
    device.close()


def test_split_job_url_is_the_one_rule() -> None:
    assert split_job_url("https://fl.example.com:8443/v1/jobs/kb") == (
        "https://fl.example.com:8443",
        "kb",
    )
    assert split_job_url("https://h/prefix/jobs/kb") == ("https://h/prefix", "kb")
    assert split_job_url("https://h/prefix/") == ("https://h/prefix", None)
