"""voltcredit gateway: meter drivers, token delivery, readings over MQTT (issue 4)."""
