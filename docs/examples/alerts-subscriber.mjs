// Prints every StockPilot Ops alert as it is raised, with the official NATS client for Node.js.
// npm install nats; NATS_URL, NATS_USER, NATS_PASSWORD from `stockpilot nats-info --role observer`.
import { connect, JSONCodec } from "nats";

const nc = await connect({
  servers: process.env.NATS_URL ?? "nats://127.0.0.1:4222",
  user: process.env.NATS_USER,
  pass: process.env.NATS_PASSWORD,
});
const json = JSONCodec();
// Core NATS: alerts raised from now on. For history, read the STOCKPILOT_ALERTS stream instead.
const sub = nc.subscribe("stockpilot.alerts.>");
console.log("listening"); // lets a supervisor (or the test) know the subscription is in place
for await (const msg of sub) {
  const alert = json.decode(msg.data);
  // `id` is derived from kind + scope + period: the same condition is announced once.
  console.log(JSON.stringify({ subject: msg.subject, id: alert.id, kind: alert.kind,
    severity: alert.severity, title: alert.title, value: alert.value, threshold: alert.threshold }));
}
