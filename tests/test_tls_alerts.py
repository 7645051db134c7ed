"""The TLS certificate expiry alerts (deploy/prometheus/alerts.yml) under promtool's rule tests,
as tests/test_prometheus.py tests the others: a series of days left, and when each alert fires."""

from __future__ import annotations

import yaml

from test_prometheus import ALERTS, _fires, _series, promtool


def test_a_certificate_warns_under_30_days_and_pages_under_7(tmp_path):
    rules = yaml.safe_load(ALERTS.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # promtool compares annotations exactly: timing and labels here
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    gauge = "iso_gateway_tls_certificate_days_left"
    cert = {"side": "listener", "name": "ecom", "subject": "CN=gateway.test,O=Bank"}
    pinned = {"side": "upstream", "name": "cmi", "subject": "CN=switch.bank.test"}
    warn, crit = {"severity": "warning"}, {"severity": "critical"}
    tests = [
        {  # a certificate with 31 days left, then 29 (at 6m), then 5 (at 21m), renewed at 36m
            "interval": "1m",
            "input_series": [_series(cert, "31x5 29x15 5x15 365x10", gauge), _series(pinned, "200x45", gauge)],
            "alert_rule_test": [
                _fires("15m", "IsoGatewayTlsCertificateExpiring"),  # below 30 since 6m: pending for 10m
                _fires("17m", "IsoGatewayTlsCertificateExpiring", {**cert, **warn}),
                _fires("17m", "IsoGatewayTlsCertificateExpiringCritical"),
                _fires("25m", "IsoGatewayTlsCertificateExpiring"),  # under 7: the critical one instead
                _fires("25m", "IsoGatewayTlsCertificateExpiringCritical"),  # pending
                _fires("32m", "IsoGatewayTlsCertificateExpiringCritical", {**cert, **crit}),
                _fires("40m", "IsoGatewayTlsCertificateExpiringCritical"),  # renewed, reloaded
                _fires("40m", "IsoGatewayTlsCertificateExpiring"),
            ],
        },
        {  # an expired certificate (negative days) pages
            "interval": "1m",
            "input_series": [_series(pinned, "-3x20", gauge)],
            "alert_rule_test": [_fires("11m", "IsoGatewayTlsCertificateExpiringCritical", {**pinned, **crit})],
        },
    ]
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}))
    result = promtool("test", "rules", str(spec), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
