"""The tracking URI's password never reaches stdout (MLflow prints a "View run ... at:" link)."""

from __future__ import annotations

from tasks.mlflow_registry import close_audit_run, open_audit_run


def test_closing_a_run_prints_no_credentials(mlflow_server, capfd) -> None:
    secret = "Pa55-word-never-printed"
    uri = mlflow_server.replace("http://", f"http://auditor:{secret}@")
    run_id = open_audit_run(uri, "password-check", "audit x", {"leapcore.model_uri": "m"})
    close_audit_run(uri, run_id, "FINISHED")
    out, err = capfd.readouterr()
    assert secret not in out and secret not in err
    assert "View run" not in out
