// Validates an AsyncAPI document with the AsyncAPI initiative's own parser (@asyncapi/parser):
// prints every diagnostic, exits 1 when any is an error. Usage: node validate-asyncapi.mjs FILE
import { readFileSync } from "node:fs";
import { Parser } from "@asyncapi/parser";

const file = process.argv[2];
const parser = new Parser();
const { document, diagnostics } = await parser.parse(readFileSync(file, "utf8"));
let errors = 0;
for (const d of diagnostics) {
  // Spectral severities: 0 error, 1 warning, 2 info, 3 hint.
  if (d.severity === 0) errors += 1;
  console.log(`${["error", "warning", "info", "hint"][d.severity]} ${d.path.join(".")}: ${d.message}`);
}
if (!document || errors > 0) {
  console.log(`${file}: ${errors} error(s)`);
  process.exit(1);
}
console.log(`${file}: valid AsyncAPI ${document.version()}, ${document.channels().length} channels`);
