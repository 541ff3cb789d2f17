"""``voltcredit keys`` run in-process through the root command: output and error messages."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from backend.cli import main
from backend.keys.store import FileKeyStore, KeyState
from firmware_protocol import messages
from firmware_protocol.messages import KeyAction, KeyChange

Capsys = pytest.CaptureFixture[str]


@pytest.fixture
def kdir(tmp_path: Path) -> Path:
    return tmp_path / "keys"


def run(capsys: Capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def meters_file(tmp_path: Path, content: object) -> Path:
    path = tmp_path / "meters.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def plan_lines(out: str) -> list[tuple[int, int, bytes]]:
    rows = [line.split() for line in out.splitlines() if not line.startswith("#")]
    return [(int(m), int(i), bytes.fromhex(h)) for m, i, h in rows]


def test_generate_list_show_public(capsys: Capsys, kdir: Path) -> None:
    assert run(capsys, "keys", "generate", "--dir", str(kdir)) == (
        0,
        f"generated key 1 (ACTIVE) in {kdir}\n",
        "",
    )
    code, out, _ = run(capsys, "keys", "generate", "--dir", str(kdir))
    assert code == 0
    assert out.startswith(f"generated key 2 (NEXT) in {kdir}\n")
    assert "voltcredit keys activate 2" in out

    code, out, _ = run(capsys, "keys", "list", "--dir", str(kdir))
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == ["KEY", "STATE", "CREATED", "ACTIVATED", "RETIRED"]
    assert first.split()[:2] == ["1", "ACTIVE"]
    assert second.split()[:2] == ["2", "NEXT"]
    assert second.split()[3:] == ["-", "-"]

    store = FileKeyStore(kdir)
    code, out, _ = run(capsys, "keys", "show-public", "--dir", str(kdir))
    assert code == 0
    # The format meter-sim --trusted-key reads: "<key id> <64 hex>".
    assert out == "".join(f"{k} {v.hex()}\n" for k, v in store.public_keys().items())


def test_activate_and_show_public_of_a_retired_key(capsys: Capsys, kdir: Path) -> None:
    run(capsys, "keys", "generate", "--dir", str(kdir))
    run(capsys, "keys", "generate", "--dir", str(kdir))
    code, out, _ = run(capsys, "keys", "activate", "2", "--dir", str(kdir))
    assert code == 0
    assert out.splitlines()[0] == "key 2 is ACTIVE: every new message is signed with it"
    assert out.splitlines()[1].startswith("key 1 is RETIRED")
    store = FileKeyStore(kdir)
    assert run(capsys, "keys", "show-public", "--dir", str(kdir))[1] == (
        f"2 {store.info(2).public_key.hex()}\n"
    )
    # Named explicitly, a retired key's public part is still shown (for audits).
    assert run(capsys, "keys", "show-public", "1", "--dir", str(kdir))[1] == (
        f"1 {store.info(1).public_key.hex()}\n"
    )
    _, out, _ = run(capsys, "keys", "list", "--dir", str(kdir))
    assert [line.split()[1] for line in out.splitlines()[1:]] == ["RETIRED", "ACTIVE"]


def test_directory_from_the_environment(
    capsys: Capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VOLTCREDIT_KEY_DIR", str(tmp_path / "env-keys"))
    assert run(capsys, "keys", "generate")[0] == 0
    assert FileKeyStore(tmp_path / "env-keys").active_signer().key_id == 1


def test_default_directory_is_var_keys(
    capsys: Capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VOLTCREDIT_KEY_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert run(capsys, "keys", "generate")[0] == 0
    assert (tmp_path / "var" / "keys" / "key-1.seed").exists()


def test_empty_store_lists_nothing(capsys: Capsys, kdir: Path) -> None:
    kdir.mkdir(mode=0o700)
    assert run(capsys, "keys", "list", "--dir", str(kdir)) == (
        0,
        f"no keys in {kdir} (`voltcredit keys generate` makes one)\n",
        "",
    )


def test_errors_are_one_line_and_exit_1(capsys: Capsys, kdir: Path) -> None:
    code, out, err = run(capsys, "keys", "list", "--dir", str(kdir))
    assert (code, out) == (1, "")
    assert err == (
        f"voltcredit keys: error: no key store at {kdir} "
        f"(`voltcredit keys generate --dir {kdir}` creates one)\n"
    )
    run(capsys, "keys", "generate", "--dir", str(kdir))
    kdir.chmod(0o755)
    code, _, err = run(capsys, "keys", "show-public", "--dir", str(kdir))
    assert code == 1
    assert err.startswith(f"voltcredit keys: error: directory {kdir} has mode 0755")
    kdir.chmod(0o700)
    code, _, err = run(capsys, "keys", "activate", "9", "--dir", str(kdir))
    assert (code, err) == (1, "voltcredit keys: error: no signing key with id 9\n")
    code, _, err = run(capsys, "keys", "activate", "1", "--dir", str(kdir))
    assert code == 1
    assert "key 1 is ACTIVE: only a NEXT key can be activated" in err


@pytest.mark.parametrize("bad", ["0", "-1", "x", str(2**32)])
def test_bad_key_id_is_a_usage_error(capsys: Capsys, kdir: Path, bad: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["keys", "activate", bad, "--dir", str(kdir)])
    assert info.value.code == 2
    assert "KEY_ID" in capsys.readouterr().err


def test_plan_rotation_steps(capsys: Capsys, kdir: Path, tmp_path: Path) -> None:
    run(capsys, "keys", "generate", "--dir", str(kdir))
    run(capsys, "keys", "generate", "--dir", str(kdir))
    meters = meters_file(
        tmp_path, [{"meter_id": 123, "next_msg_id": 5}, {"meter_id": 124, "next_msg_id": 1}]
    )
    code, out, err = run(
        capsys, "keys", "plan-rotation", "--meters", str(meters), "--dir", str(kdir)
    )
    assert (code, err) == (0, "")
    assert out.startswith("# key rotation step 1 of 3 (ADD): meters learn key 2, signed by")
    store = FileKeyStore(kdir)
    trusted = {1: messages.load_public_key(store.info(1).public_key)}
    now = int(time.time())
    rows = plan_lines(out)
    assert [(m, i) for m, i, _ in rows] == [(123, 5), (124, 1)]
    for meter, msg_id, data in rows:
        msg = messages.verify(data, trusted, meter_id=meter, now=now)
        assert isinstance(msg, KeyChange)
        assert (msg.action, msg.target_key_id, msg.header.msg_id) == (KeyAction.ADD, 2, msg_id)
        assert msg.public_key == store.info(2).public_key
        assert msg.header.expires_at - msg.header.issued_at == 7 * 86_400

    run(capsys, "keys", "activate", "2", "--dir", str(kdir))
    code, out, _ = run(
        capsys,
        "keys",
        "plan-rotation",
        "--meters",
        str(meters),
        "--dir",
        str(kdir),
        "--validity-days",
        "1",
    )
    assert code == 0
    assert "step 3 of 3 (REVOKE): meters forget key 1" in out
    trusted = {2: messages.load_public_key(store.info(2).public_key)}
    for meter, _, data in plan_lines(out):
        msg = messages.verify(data, trusted, meter_id=meter, now=now)
        assert isinstance(msg, KeyChange)
        assert (msg.action, msg.target_key_id) == (KeyAction.REVOKE, 1)
        assert msg.header.expires_at - msg.header.issued_at == 86_400


def test_plan_rotation_explicit_step_and_key(capsys: Capsys, kdir: Path, tmp_path: Path) -> None:
    for _ in range(3):
        run(capsys, "keys", "generate", "--dir", str(kdir))
    meters = meters_file(tmp_path, [{"meter_id": 9, "next_msg_id": 2}])
    args = ["keys", "plan-rotation", "--meters", str(meters), "--dir", str(kdir)]
    _, out, _ = run(capsys, *args)
    assert "meters learn key 3" in out  # the newest NEXT key by default
    _, out, _ = run(capsys, *args, "--key", "2")
    assert "meters learn key 2" in out
    code, _, err = run(capsys, *args, "--step", "revoke")
    assert (code, err) == (
        1,
        "voltcredit keys: error: no RETIRED key to revoke: activate the NEXT key first (step 2)\n",
    )
    code, _, err = run(capsys, *args, "--key", "1")
    assert code == 1
    assert "key 1 is ACTIVE: only a NEXT key is added to meters" in err
    run(capsys, "keys", "activate", "3", "--dir", str(kdir))
    _, out, _ = run(capsys, *args, "--key", "1")
    assert "meters forget key 1" in out
    _, out, _ = run(capsys, *args, "--step", "add")
    assert "meters learn key 2" in out
    assert FileKeyStore(kdir).info(2).state is KeyState.NEXT  # planning changes nothing


def test_plan_rotation_with_no_meters_prints_only_comments(
    capsys: Capsys, kdir: Path, tmp_path: Path
) -> None:
    run(capsys, "keys", "generate", "--dir", str(kdir))
    run(capsys, "keys", "generate", "--dir", str(kdir))
    code, out, _ = run(
        capsys,
        "keys",
        "plan-rotation",
        "--meters",
        str(meters_file(tmp_path, [])),
        "--dir",
        str(kdir),
    )
    assert code == 0
    assert plan_lines(out) == []
    assert "valid from" not in out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[{", "is not JSON"),
        ({"meter_id": 1, "next_msg_id": 1}, "expected a JSON list of meters"),
        ([{"meter_id": 1}], 'item 0 must be {"meter_id": N, "next_msg_id": N}'),
        ([{"meter_id": 1, "next_msg_id": 1, "x": 0}], "item 0 must be"),
        ([7], "item 0 must be"),
        ([{"meter_id": 1, "next_msg_id": 0}], "meter 1: msg_id must be an integer 1..2**32-1"),
        ([{"meter_id": "1", "next_msg_id": 1}], "meter_id must be an integer"),
        (
            [{"meter_id": 1, "next_msg_id": 1}, {"meter_id": 1, "next_msg_id": 2}],
            "meter 1 appears twice",
        ),
    ],
)
def test_plan_rotation_bad_meters_file(
    capsys: Capsys, kdir: Path, tmp_path: Path, content: object, message: str
) -> None:
    run(capsys, "keys", "generate", "--dir", str(kdir))
    run(capsys, "keys", "generate", "--dir", str(kdir))
    path = meters_file(tmp_path, content)
    code, out, err = run(capsys, "keys", "plan-rotation", "--meters", str(path), "--dir", str(kdir))
    assert (code, out) == (1, "")
    assert err.startswith("voltcredit keys: error: ")
    assert message in err


def test_plan_rotation_missing_meters_file(capsys: Capsys, kdir: Path, tmp_path: Path) -> None:
    code, _, err = run(
        capsys,
        "keys",
        "plan-rotation",
        "--meters",
        str(tmp_path / "none.json"),
        "--dir",
        str(kdir),
    )
    assert code == 1
    assert f"cannot read --meters file {tmp_path / 'none.json'}: No such file" in err


@pytest.mark.parametrize("days", ["0", "3651", "1.5"])
def test_bad_validity_is_a_usage_error(capsys: Capsys, tmp_path: Path, days: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(["keys", "plan-rotation", "--meters", "m.json", "--validity-days", days])
    assert info.value.code == 2
    assert "--validity-days" in capsys.readouterr().err


def test_keys_without_action_is_a_usage_error(capsys: Capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["keys"])
    assert info.value.code == 2
