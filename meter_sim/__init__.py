"""voltcredit meter simulator: a faithful prepaid smart meter over Modbus (issue 3)."""
