// matrix-rust-sdk's key backup (its WebAssembly build, from the E2EE client's packages),
// driven by tests/crypto/test_backup.py: one JSON command on stdin, one JSON answer out.
//   {"op": "backup", "key": <backup private key, base64>, "room": ..., "user": ..., "device": ...}
//     -> an OlmMachine shares a room key, backs it up under that key, and encrypts one
//        event with it: {"request": <the PUT /room_keys/keys body>, "event": <content>}
//   {"op": "decrypt", "key": ..., "session_data": {...}} -> the plaintext (decryptV1)
//   {"op": "import", "key": ..., "room": ..., "session_id": ..., "session_data": {...},
//    "user": ..., "device": ..., "event": <an m.room.encrypted event>}
//     -> importBackedUpRoomKeys of the decrypted entry, then the event decrypted with it
import * as sdk from "../e2ee_client/node_modules/@matrix-org/matrix-sdk-crypto-wasm/node.mjs";

await sdk.initAsync();
const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const cmd = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const out = (obj) => process.stdout.write(JSON.stringify(obj) + "\n");
try {
  const key = sdk.BackupDecryptionKey.fromBase64(cmd.key);
  let result = null;
  switch (cmd.op) {
    case "backup": {
      const m = await sdk.OlmMachine.initialize(new sdk.UserId(cmd.user), new sdk.DeviceId(cmd.device));
      await m.enableBackupV1(key.megolmV1PublicKey.publicKeyBase64, "1");
      const room = new sdk.RoomId(cmd.room);
      await m.shareRoomKey(room, [new sdk.UserId(cmd.user)], new sdk.EncryptionSettings());
      const event = JSON.parse(await m.encryptRoomEvent(room, "m.room.message", JSON.stringify({ body: "from rust" })));
      const request = await m.backupRoomKeys();
      result = { request: request ? JSON.parse(request.body) : null, event, public_key: key.megolmV1PublicKey.publicKeyBase64 };
      break;
    }
    case "decrypt": {
      const d = cmd.session_data;
      result = JSON.parse(key.decryptV1(d.ephemeral, d.mac, d.ciphertext));
      break;
    }
    case "import": {
      const m = await sdk.OlmMachine.initialize(new sdk.UserId(cmd.user), new sdk.DeviceId(cmd.device));
      const d = cmd.session_data;
      const plain = JSON.parse(key.decryptV1(d.ephemeral, d.mac, d.ciphertext));
      const room = new sdk.RoomId(cmd.room);
      const keys = new Map([[room, new Map([[cmd.session_id, plain]])]]);
      const imported = await m.importBackedUpRoomKeys(keys, null, "1");
      const decrypted = await m.decryptRoomEvent(JSON.stringify(cmd.event), new sdk.RoomId(cmd.room), new sdk.DecryptionSettings(sdk.TrustRequirement.Untrusted));
      result = { imported: imported.importedCount, total: imported.totalCount, event: JSON.parse(decrypted.event) };
      break;
    }
    default:
      throw new Error("unknown op " + cmd.op);
  }
  out({ ok: true, result });
} catch (e) {
  // wasm errors are objects with a code and a description, not Errors.
  const what = e && (e.stack || [e.constructor && e.constructor.name, e.code, e.description].join(": "));
  out({ ok: false, error: what || String(e) });
}
